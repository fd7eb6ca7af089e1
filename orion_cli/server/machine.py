"""The machine as ``orion serve`` shows it (the ``machine`` part of ``/api/orion/ps``), and its memory over
the last minutes (:class:`MemoryHistory`, ``/api/orion/history``).

For the RAM and each GPU: what is in use, what orion's loaded models hold there (the measure, else the
estimate, as the budgets count them), the rest as other processes' (this server's own process among
them), and the budget. RPC servers are shown as this process last asked them (never asked here: a server
serves one client at a time, and a dashboard polling it would take it from the model that uses it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Sequence

from ..ledger import gpu_device, rpc_device


def machine_document(strategy, memory, gpus: Sequence, statuses: Sequence, gpu_budgets: Sequence[int]) -> dict:
    """``ram``, ``gpus`` and ``rpc_servers``, from a memory reading (:class:`orion_cli.device.MemoryNow`),
    the GPUs read now (:class:`orion_cli.device.GPUInfo`), the manager's statuses and each GPU's budget."""
    orion_ram = sum(s.budget_bytes for s in statuses)
    ram = {"limit_bytes": memory.limit_bytes, "in_use_bytes": memory.in_use_bytes, "source": memory.source,
           "orion_bytes": orion_ram, "others_bytes": max(0, memory.in_use_bytes - orion_ram),
           "budget_bytes": strategy.memory_budget_bytes}
    rows = []
    for g in gpus:
        orion = sum(s.memory.on(gpu_device(g.index)) for s in statuses)
        rows.append({"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "used_bytes": g.used_bytes,
                     "orion_bytes": orion, "others_bytes": max(0, g.used_bytes - orion),
                     "budget_bytes": gpu_budgets[g.index] if g.index < len(gpu_budgets) else None})
    return {"ram": ram, "gpus": rows, "rpc_servers": rpc_rows(strategy, statuses)}


def rpc_rows(strategy, statuses: Sequence) -> list[dict]:
    """Each RPC server of the strategy: what orion's models hold there, its budget (``=SIZE``, or from
    its devices as this process last asked them; None: not known) and those devices (None: never asked)."""
    from ..rpc import known_devices
    from ..rpc_endpoints import parse_rpc_servers

    out = []
    for server in parse_rpc_servers(strategy.rpc_servers):
        devices = known_devices(server, strategy.pressure_high)
        budget = sum(d.budget_bytes for d in devices) if devices is not None else server.budget_bytes
        out.append({"endpoint": server.endpoint, "budget_bytes": budget,
                    "orion_bytes": sum(s.memory.on(rpc_device(server.endpoint)) for s in statuses),
                    "devices": None if devices is None else [d.to_dict() for d in devices]})
    return out


def memory_sample(machine: dict) -> dict:
    """What the history keeps of a ``machine`` document: RAM and each GPU, in use and orion's."""
    ram = machine["ram"]
    return {"ram_in_use_bytes": ram["in_use_bytes"], "ram_orion_bytes": ram["orion_bytes"],
            "gpus": [{"index": g["index"], "used_bytes": g["used_bytes"], "orion_bytes": g["orion_bytes"]}
                     for g in machine["gpus"]]}


class MemoryHistory:
    """The newest ``keep`` samples of ``read()`` (a dict), one each ``interval_s`` while :meth:`run` runs,
    each stamped ``at`` by ``clock`` (seconds since the epoch). Tests call :meth:`sample` with their clock."""

    def __init__(self, read: Callable[[], dict], *, interval_s: float = 2.0, keep: int = 300,
                 clock: Callable[[], float] = time.time, on_error: Callable[[str], None] | None = None) -> None:
        self._read = read
        self.interval_s = interval_s
        self.keep = keep
        self._clock = clock
        self._on_error = on_error
        self._samples: deque[dict] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def sample(self) -> dict:
        doc = {"at": round(self._clock(), 3), **self._read()}
        with self._lock:
            self._samples.append(doc)
        return doc

    def document(self) -> dict:
        """``GET /api/orion/history``: the samples, oldest first."""
        with self._lock:
            samples = list(self._samples)
        return {"interval_s": self.interval_s, "keep": self.keep, "samples": samples}

    def run(self, stop: threading.Event) -> None:
        """Sample now, then every ``interval_s`` until ``stop`` is set. A reading that fails is said
        (``on_error``) once in a row, not a dead sampler."""
        failing = False
        while True:
            try:
                self.sample()
                failing = False
            except Exception as exc:  # noqa: BLE001 - a probe that failed once: the next may work
                if not failing and self._on_error is not None:
                    self._on_error(f"warning: the memory history could not read the machine: {type(exc).__name__}: {exc}")
                failing = True
            if stop.wait(self.interval_s):
                return
