"""What a load really took on each device: the model manager's default memory probe.

A probe is called with the manager's request and its load (a function of no argument), loads, and
returns the model and a :class:`~orion_cli.ledger.Measured`; tests inject their own.
:class:`LoadProbe` measures:

- RAM: a runner's resident growth across its load, ``rss_after - rss_before`` as the runner reports
  them (its interpreter and llama.cpp's library were resident before: they are its ``base_bytes``);
  in-process, this process's RSS growth across the load, one in-process load at a time, so that the
  growth is the model's own.
- VRAM, for a request that puts layers on a GPU: NVML's count of the process's memory on each GPU
  (``nvmlDeviceGetComputeRunningProcesses``: the runner's pid, or this process's growth); where NVML
  does not list the process (no pynvml, another pid namespace), each GPU's used memory's growth
  across the load (NVML or ``nvidia-smi``), which counts other processes' changes meanwhile too.
- RPC servers: not measured. A server serves one client at a time, and the model holds it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .ledger import Measured


@dataclass(frozen=True)
class GPUMemory:
    """Each GPU's used bytes by index, and (NVML only) each process's bytes on it: {index: {pid: bytes}}."""

    used: dict[int, int]
    by_pid: dict[int, dict[int, int]] | None = None


def nvml_memory() -> GPUMemory | None:
    """Each GPU's memory through NVML (the nvidia-ml-py package), or None when it is not usable."""
    from .device import nvml

    with nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            used: dict[int, int] = {}
            by_pid: dict[int, dict[int, int]] = {}
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                used[i] = max(0, int(mem.total) - int(mem.free))  # as device.GPUInfo counts it
                procs: dict[int, int] = {}
                try:
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        if p.usedGpuMemory is not None:  # None: the driver does not say (some vGPUs, MIG)
                            procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(p.usedGpuMemory)
                except Exception:  # noqa: BLE001 - not supported here: the used-memory growth answers
                    pass
                by_pid[i] = procs
            return GPUMemory(used, by_pid)
        except Exception:  # noqa: BLE001 - a GPU that fails its query: no measure, never a failed load
            return None


def gpu_memory_now() -> GPUMemory | None:
    """NVML's figures, else ``nvidia-smi``'s used memory of each GPU; None without either."""
    nvml = nvml_memory()
    if nvml is not None:
        return nvml
    from .device import detect_gpus

    gpus = detect_gpus()
    return GPUMemory({g.index: g.used_bytes for g in gpus}) if gpus else None


def vram_of(pid: int, before: GPUMemory | None, after: GPUMemory | None, *, growth: bool) -> dict[int, int]:
    """Each GPU's VRAM of process ``pid`` (``growth``: what it added between ``before`` and
    ``after``), from NVML's per-process count where it lists the process, else each GPU's used
    memory's growth; empty when neither is known."""
    if after is None:
        return {}
    if after.by_pid is not None and any(pid in procs for procs in after.by_pid.values()):
        now = {i: after.by_pid.get(i, {}).get(pid, 0) for i in after.used}
        if growth:
            was = before.by_pid if before is not None and before.by_pid is not None else {}
            return {i: max(0, b - was.get(i, {}).get(pid, 0)) for i, b in now.items()}
        return now
    if before is None:
        return {}
    return {i: max(0, b - before.used.get(i, 0)) for i, b in after.used.items()}


class LoadProbe:
    """The default probe (see the module's docstring). ``in_process``: models load in this process
    (``orion run``, ``ORION_RUNNERS=0``), not in runner processes; ``prepare`` runs before the
    first in-process measure (the engine's library imported, so that its memory is not the first
    model's)."""

    def __init__(self, *, in_process: bool, prepare: Callable[[], None] | None = None,
                 gpu_memory: Callable[[], GPUMemory | None] = gpu_memory_now,
                 rss: Callable[[], int] | None = None) -> None:
        from .device import process_memory_bytes

        self.in_process = in_process
        self._prepare = prepare
        self._gpu_memory = gpu_memory
        self._rss = rss or process_memory_bytes
        self._lock = threading.Lock()

    def _gpus(self, request) -> GPUMemory | None:
        if not request.gpu_bytes:  # nothing planned for a GPU: none looked at (another process's use is noise)
            return None
        try:
            return self._gpu_memory()
        except Exception:  # noqa: BLE001 - no figure, never a failed load
            return None

    def __call__(self, request, load: Callable[[], Any]) -> tuple[Any, Measured]:
        if not self.in_process:
            before = self._gpus(request)
            model = load()
            return model, self._runner(model, request, before)
        with self._lock:  # one in-process load at a time: the growth is this one's
            if self._prepare is not None:
                self._prepare()
                self._prepare = None
            rss = self._rss()
            before = self._gpus(request)
            model = load()
            after = self._gpus(request)
            vram = vram_of(os.getpid(), before, after, growth=True) if request.gpu_bytes else {}
            return model, Measured(max(0, self._rss() - rss), vram)

    def _runner(self, model, request, before: GPUMemory | None) -> Measured:
        growth = getattr(model, "load_growth_bytes", None)
        base = getattr(model, "base_bytes", None)
        pid = getattr(model, "pid", 0) or 0
        vram = vram_of(pid, before, self._gpus(request), growth=False) if request.gpu_bytes and pid else {}
        return Measured(growth if isinstance(growth, int) else None, vram, base if isinstance(base, int) else None)
