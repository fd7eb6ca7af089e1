"""What this machine has: memory (and the limit a container sets), CPU, GPUs, disk.

Every probe is a plain function over files or command output, so tests feed it
recorded ``/proc`` and ``/sys/fs/cgroup`` fixtures and ``nvidia-smi`` output.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import subprocess

from .paths import existing_parent, hf_cache_dir

# cgroup v1 writes a huge number (PAGE_COUNTER_MAX * page size) for "no limit".
_V1_UNLIMITED = 1 << 62

# /proc/cpuinfo flag -> the name llama.cpp's build options use.
_CPU_FLAGS = {
    "avx": "AVX",
    "avx2": "AVX2",
    "avx512f": "AVX512",
    "f16c": "F16C",
    "fma": "FMA",
    "amx_tile": "AMX",
    "asimd": "NEON",  # aarch64 Linux calls NEON "asimd"
    "neon": "NEON",  # 32-bit ARM
}
_FLAG_ORDER = ("AVX", "AVX2", "AVX512", "F16C", "FMA", "AMX", "NEON")


@dataclass(frozen=True)
class CgroupMemory:
    """The memory controller of the cgroup this process runs in."""

    version: int
    limit_bytes: int | None  # None: no limit set anywhere up the hierarchy
    usage_bytes: int | None  # charged memory minus reclaimable page cache


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int  # what other processes hold is total - free
    driver: str | None = None
    compute_capability: str | None = None  # "9.0" for Hopper
    cuda_version: str | None = None  # the newest CUDA the driver runs ("13.0")

    @property
    def used_bytes(self) -> int:
        return max(0, self.total_bytes - self.free_bytes)


@dataclass(frozen=True)
class DeviceInfo:
    """The machine as orion sees it. ``memory_limit_bytes`` is what models must fit in."""

    ram_total_bytes: int
    ram_available_bytes: int
    memory_limit_bytes: int
    memory_limit_source: str
    memory_in_use_bytes: int
    cgroup: CgroupMemory | None
    cpu_model: str
    physical_cores: int
    logical_cores: int
    usable_cores: int
    cpu_flags: tuple[str, ...]
    gpus: tuple[GPUInfo, ...]
    disk_free_bytes: int
    disk_path: str
    os: str
    arch: str
    simulated: bool = False

    @property
    def memory_available_bytes(self) -> int:
        return max(0, self.memory_limit_bytes - self.memory_in_use_bytes)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- cgroups


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _hierarchy(base: Path, rel: str) -> list[Path]:
    """The cgroup's folder and its parents up to the mount root.

    Without a cgroup namespace (common for v1 containers) /proc/self/cgroup
    names a path that is not mounted inside the container: then the mount
    root is the container's own cgroup.
    """
    leaf = base / rel.lstrip("/")
    if not leaf.is_dir():
        return [base]
    dirs = [leaf]
    while dirs[-1] != base and base in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return dirs


def read_cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> CgroupMemory | None:
    """The memory limit and usage of this process's cgroup (v1 or v2), or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1_rel = v2_rel = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, rel = parts
        if hierarchy_id == "0" and controllers == "":
            v2_rel = rel
        elif "memory" in controllers.split(","):
            v1_rel = rel

    if v1_rel is not None and (root / "memory").is_dir():
        dirs = _hierarchy(root / "memory", v1_rel)
        limits = [_read_int(d / "memory.limit_in_bytes") for d in dirs]
        limits = [x for x in limits if x is not None and x < _V1_UNLIMITED]
        usage = _read_int(dirs[0] / "memory.usage_in_bytes")
        if usage is not None:
            usage = max(0, usage - _stat_value(dirs[0] / "memory.stat", "total_inactive_file"))
        return CgroupMemory(1, min(limits) if limits else None, usage)

    if v2_rel is not None and (root / "cgroup.controllers").exists():
        dirs = _hierarchy(root, v2_rel)
        limits = [_read_int(d / "memory.max") for d in dirs]
        limits = [x for x in limits if x is not None]
        usage = _read_int(dirs[0] / "memory.current")
        if usage is not None:
            usage = max(0, usage - _stat_value(dirs[0] / "memory.stat", "inactive_file"))
        return CgroupMemory(2, min(limits) if limits else None, usage)
    return None


# ---------------------------------------------------------------- CPU


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...], int | None]:
    """The CPU model, the llama.cpp-relevant flags and the physical core count
    (None where the file does not say, as on ARM) from /proc/cpuinfo text."""
    model = ""
    raw_flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    package = core = None
    for line in text.splitlines() + [""]:
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:  # a blank line ends one logical CPU's block
            if core is not None:
                cores.add((package or "0", core))
            package = core = None
            continue
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not raw_flags:
            raw_flags = set(value.split())
        elif key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
    flags = {_CPU_FLAGS[f] for f in raw_flags if f in _CPU_FLAGS}
    return model, tuple(f for f in _FLAG_ORDER if f in flags), len(cores) or None


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...], int | None]:
    try:
        model, flags, physical = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        model, flags, physical = "", (), None
    arch = _uname()[2].lower()
    if not flags and arch in ("arm64", "aarch64"):
        flags = ("NEON",)  # every 64-bit ARM core (Apple silicon included) has NEON
    return model or arch or "unknown CPU", flags, physical


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 itself (x86's avx512_bf16: ggml's BF16 dot product). Not among
    :func:`cpu_info`'s flags, which key the engine's build and check."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return "avx512_bf16" in value.split()
    return False


def _uname() -> tuple[str, str, str]:
    """System, release and machine; os.uname avoids importing platform (POSIX)."""
    if hasattr(os, "uname"):
        u = os.uname()
        return u.sysname, u.release, u.machine
    import platform

    return platform.system(), platform.release(), platform.machine()


def parse_meminfo(text: str) -> tuple[int, int] | None:
    """MemTotal and MemAvailable, in bytes, from /proc/meminfo text."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(rest.split()[0]) * 1024
    if len(values) != 2:
        return None
    return values["MemTotal"], values["MemAvailable"]


def ram(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM."""
    # /proc/meminfo on Linux is what psutil reads too; reading it directly keeps
    # psutil's import (~20 ms) out of `orion profile`. Elsewhere, psutil.
    try:
        parsed = parse_meminfo(meminfo.read_text())
    except (OSError, ValueError, IndexError):
        parsed = None
    if parsed:
        return parsed
    import psutil

    vm = psutil.virtual_memory()
    return vm.total, vm.available


@dataclass(frozen=True)
class MemoryNow:
    """The memory models must fit in, now: the cgroup's limit where it is below the RAM, else the RAM."""

    limit_bytes: int
    in_use_bytes: int
    source: str  # "physical RAM" or "cgroup v2 limit"
    cgroup: CgroupMemory | None = None

    @property
    def available_bytes(self) -> int:
        return max(0, self.limit_bytes - self.in_use_bytes)

    @property
    def ratio(self) -> float:
        """In use over the limit (what the pressure lines compare with)."""
        return self.in_use_bytes / self.limit_bytes if self.limit_bytes else 1.0


def memory_now(*, cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
               meminfo: Path = Path("/proc/meminfo"), _ram_now: tuple[int, int] | None = None) -> MemoryNow:
    """The limit and use that ``orion profile``, the model manager and the server's pressure all read:
    in a container with a memory limit, the cgroup's figures (``/proc/meminfo`` shows the host's)."""
    ram_total, ram_available = _ram_now or ram(meminfo)
    cgroup = read_cgroup_memory(cgroup_root, proc_cgroup)
    if cgroup and cgroup.limit_bytes is not None and cgroup.limit_bytes < ram_total:
        in_use = cgroup.usage_bytes if cgroup.usage_bytes is not None else ram_total - ram_available
        return MemoryNow(cgroup.limit_bytes, min(in_use, cgroup.limit_bytes), f"cgroup v{cgroup.version} limit", cgroup)
    return MemoryNow(ram_total, ram_total - ram_available, "physical RAM", cgroup)


def process_memory_bytes(key: str = "VmRSS", status: Path = Path("/proc/self/status")) -> int:
    """A memory figure of this process from /proc/self/status: ``VmRSS`` (resident now) or
    ``VmHWM`` (the peak); 0 where there is no such file."""
    try:
        with status.open() as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _usable_cores(logical: int) -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return logical


# ---------------------------------------------------------------- GPU


NVIDIA_SMI_FIELDS = "index,name,memory.total,memory.free,driver_version,compute_cap"


def parse_nvidia_smi(csv_text: str, cuda_version: str | None = None) -> tuple[GPUInfo, ...]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version[,compute_cap]
    --format=csv,noheader,nounits`` output (memory in MiB)."""
    gpus = []
    for line in csv_text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            continue
        try:
            index = int(fields[0])
            total = int(float(fields[2])) * 1024**2
            free = int(float(fields[3])) * 1024**2
        except ValueError:
            continue  # "[N/A]" on some virtual GPUs: nothing usable to report
        driver = fields[4] if len(fields) > 4 and fields[4] else None
        cc = fields[5] if len(fields) > 5 and fields[5][:1].isdigit() else None
        gpus.append(GPUInfo(index, fields[1], total, free, driver, cc, cuda_version))
    return tuple(gpus)


def parse_cuda_version(text: str) -> str | None:
    """The "CUDA Version: 13.0" of plain ``nvidia-smi`` output (the driver's CUDA), or None."""
    import re

    m = re.search(r"CUDA Version\s*:\s*([0-9]+\.[0-9]+)", text)
    return m.group(1) if m else None


@contextmanager
def nvml():
    """NVML (the nvidia-ml-py package) initialised for the block and shut down after it; None inside
    where it is not usable (not installed, no driver loaded)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error types when no driver is loaded
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_gpus() -> tuple[GPUInfo, ...] | None:
    """GPUs through NVML (the nvidia-ml-py package), or None when it is not usable."""
    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    with nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            driver = text(pynvml.nvmlSystemGetDriverVersion())
            cuda = None
            try:
                v = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
                cuda = f"{v // 1000}.{v % 1000 // 10}"
            except Exception:  # older drivers: no CUDA version through NVML
                pass
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                    cc = f"{major}.{minor}"
                except Exception:
                    cc = None
                gpus.append(GPUInfo(i, text(pynvml.nvmlDeviceGetName(handle)), int(mem.total), int(mem.free),
                                    driver, cc, cuda))
            return tuple(gpus)
        except Exception:
            return None


def detect_gpus(run: Callable[..., "subprocess.CompletedProcess"] | None = None) -> tuple[GPUInfo, ...]:
    """NVIDIA GPUs through NVML, else ``nvidia-smi``; none when neither answers."""
    import subprocess

    run = run or subprocess.run
    gpus = _nvml_gpus()
    if gpus is not None:
        return gpus
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()

    def smi(*args: str) -> str | None:
        try:
            done = run([exe, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    fmt = "--format=csv,noheader,nounits"
    csv = smi(f"--query-gpu={NVIDIA_SMI_FIELDS}", fmt)
    if csv is None:  # drivers before 510 do not know compute_cap
        csv = smi(f"--query-gpu={NVIDIA_SMI_FIELDS.rsplit(',', 1)[0]}", fmt)
    if csv is None:
        return ()
    return parse_nvidia_smi(csv, parse_cuda_version(smi() or ""))


# ---------------------------------------------------------------- all together


def detect_device(
    models_dir: Path | None = None,
    *,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
    meminfo: Path = Path("/proc/meminfo"),
    gpu_probe: Callable[[], tuple[GPUInfo, ...]] = detect_gpus,
) -> DeviceInfo:
    ram_total, ram_available = ram(meminfo)
    now = memory_now(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup, meminfo=meminfo, _ram_now=(ram_total, ram_available))
    cgroup, limit, source, in_use = now.cgroup, now.limit_bytes, now.source, now.in_use_bytes

    logical = os.cpu_count() or 1
    model, flags, physical = cpu_info(cpuinfo)
    if physical is None:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical

    system, release, machine = _uname()
    disk_path = existing_parent(models_dir or hf_cache_dir())
    disk_free = shutil.disk_usage(disk_path).free

    return DeviceInfo(
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        memory_limit_bytes=limit,
        memory_limit_source=source,
        memory_in_use_bytes=min(in_use, limit),
        cgroup=cgroup,
        cpu_model=model,
        physical_cores=physical,
        logical_cores=logical,
        usable_cores=_usable_cores(logical),
        cpu_flags=flags,
        gpus=gpu_probe(),
        disk_free_bytes=disk_free,
        disk_path=str(disk_path),
        os=f"{system} {release}",
        arch=machine,
    )


def simulate(device: DeviceInfo, *, ram_bytes: int | None = None, vram_bytes: int | None = None) -> DeviceInfo:
    """The same machine with another amount of memory and nothing else running.

    A simulated device's budget comes from the given size alone: on a busy
    machine, ``--ram 1GB`` minus what runs now would leave nothing.
    """
    changes: dict = {"simulated": True}
    if ram_bytes is not None:
        changes.update(
            ram_total_bytes=ram_bytes,
            ram_available_bytes=ram_bytes,
            memory_limit_bytes=ram_bytes,
            memory_limit_source="simulated (--ram)",
            memory_in_use_bytes=0,
            cgroup=None,
        )
    if vram_bytes is not None:
        changes["gpus"] = (GPUInfo(0, "simulated GPU (--vram)", vram_bytes, vram_bytes),)
    return replace(device, **changes)
