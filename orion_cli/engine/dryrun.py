"""llama.cpp's own dry run: what each device would hold for a model and its settings, with nothing
allocated and no weight read.

llama.cpp's ``--fit`` does the same (``common/fit.cpp``): the model is loaded with
``llama_model_params.no_alloc`` (and no mmap, which asserts under no_alloc), a context made on it, and
the sizes llama.cpp would allocate are logged: the compute buffer of each device (``sched_reserve:
CUDA0 compute buffer size = ...``), the KV cache (``llama_kv_cache: size = ...``, which device holds
each layer), the output buffer. No weight is read, so a file holding only the header (the rest
sparse: ``sparse_copy``) gives the same figures as the downloaded model.

It runs in a child process (``python -m orion_cli.engine.dryrun REQUEST_JSON``): an assertion in
llama.cpp aborts the process, and the server must not be it. Results are cached by the header's
bytes and the settings (``ORION_HOME/cache/dryrun``): a header read once is never dry-run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from ..estimate import EngineSettings
from .spec import LoadSpec

MiB = 1024**2
DRY_RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DryRun:
    """What llama.cpp would allocate, by buffer name (``CPU``, ``CUDA0``, ``CUDA_Host``...)."""

    compute: dict[str, int] = field(default_factory=dict)  # compute buffer of each device
    kv_bytes: int = 0  # the whole KV cache (every layer, K + V)
    kv_layers: dict[str, int] = field(default_factory=dict)  # device -> layers of the KV cache it holds
    output: dict[str, int] = field(default_factory=dict)  # the output (logits/embeddings) buffer
    log_tail: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return {"compute": self.compute, "kv_bytes": self.kv_bytes, "kv_layers": self.kv_layers,
                "output": self.output}

    @classmethod
    def from_dict(cls, d: dict) -> "DryRun":
        return cls(compute={k: int(v) for k, v in d["compute"].items()}, kv_bytes=int(d["kv_bytes"]),
                   kv_layers={k: int(v) for k, v in d["kv_layers"].items()},
                   output={k: int(v) for k, v in d["output"].items()})


_COMPUTE = re.compile(r"sched_reserve:\s+(\S+) compute buffer size =\s+([\d.]+) MiB")
_OUTPUT = re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s+([\d.]+) MiB")
_KV_SIZE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB")
_KV_LAYER = re.compile(r"llama_kv_cache: layer\s+\d+: dev = (\S+)")


def parse_log(text: str) -> DryRun:
    """The figures of a dry run from llama.cpp's log (sizes are logged in MiB with 2 decimals: within
    5 KiB of the byte count). A context logs its compute buffer twice when it reserves again: the last
    figure is the one it keeps."""
    compute: dict[str, int] = {}
    for name, mib in _COMPUTE.findall(text):
        compute[name] = round(float(mib) * MiB)
    output = {name: round(float(mib) * MiB) for name, mib in _OUTPUT.findall(text)}
    kv = sum(round(float(mib) * MiB) for mib in _KV_SIZE.findall(text))
    layers: dict[str, int] = {}
    for dev in _KV_LAYER.findall(text):
        layers[dev] = layers.get(dev, 0) + 1
    return DryRun(compute=compute, kv_bytes=kv, kv_layers=layers, output=output, log_tail=text[-4000:])


def header_digest(path: Path, data_offset: int) -> str:
    """sha256 of a GGUF's header bytes (everything before its tensor data) and its size: what a dry
    run depends on, the same for a header-only sparse copy and the downloaded file. Read once a
    process for a file that did not change (a load asks for it for the dry run and for the ledger)."""
    st = path.stat()
    return _digest(str(path), data_offset, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _digest(path: str, data_offset: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = data_offset
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    h.update(str(size).encode())
    return h.hexdigest()


def sparse_copy(header_bytes: bytes, size: int, dest: Path) -> Path:
    """A file of ``size`` bytes holding only ``header_bytes`` (the rest a hole: no disk used), which
    llama.cpp's dry run reads as it would the real model."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        f.write(header_bytes)
        f.truncate(size)
    return dest


def cached_sparse_copy(header_bytes: bytes, size: int) -> Path | None:
    """A sparse copy of a remote file's header (``sparse_copy``) in orion's cache, named by its digest;
    None where it cannot be had: the cache not writable, or a filesystem without holes (the copy would
    take the model's whole size on disk)."""
    import tempfile

    h = hashlib.sha256(header_bytes)
    h.update(str(size).encode())
    dest = cache_dir() / "headers" / f"{h.hexdigest()[:32]}.gguf"
    try:
        if dest.exists() and dest.stat().st_size == size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        os.close(fd)
        sparse_copy(header_bytes, size, Path(tmp))
        if os.stat(tmp).st_blocks * 512 > 2 * len(header_bytes) + (1 << 20):
            os.unlink(tmp)  # no holes here: not worth a model-sized file
            return None
        os.replace(tmp, dest)
    except OSError:
        return None
    return dest


def cache_dir() -> Path:
    from ..paths import orion_home

    return orion_home() / "cache" / "dryrun"


def spec_to_json(spec: LoadSpec) -> dict:
    d = asdict(spec)
    d["path"] = str(spec.path)
    d["projector"] = str(spec.projector) if spec.projector else None
    return d


def spec_from_json(d: dict) -> LoadSpec:
    d = dict(d)
    d["path"] = Path(d["path"])
    d["projector"] = Path(d["projector"]) if d.get("projector") else None
    d["settings"] = EngineSettings(**d["settings"])
    d["tensor_split"] = tuple(d["tensor_split"])
    d["rpc_servers"] = tuple(d["rpc_servers"])
    return LoadSpec(**d)


def dry_run_key(spec: LoadSpec, digest: str) -> str:
    """The cache key of a dry run: the header's digest and every setting but the path (and the threads,
    which change no buffer)."""
    d = spec_to_json(spec)
    for k in ("path", "threads", "projector", "contexts"):
        d.pop(k)
    d["engine"] = _engine_version()  # another llama.cpp sizes its buffers its own way
    d["gpus"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return hashlib.sha256(f"{digest}|{json.dumps(d, sort_keys=True)}".encode()).hexdigest()[:32]


def _engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "unknown"


def dry_run(spec: LoadSpec, digest: str, *, timeout: float = DRY_RUN_TIMEOUT_S, use_cache: bool = True) -> DryRun:
    """llama.cpp's figures for loading ``spec`` (whose header hashes to ``digest``), from the cache or a
    child process. Raises :class:`DryRunFailed` when llama.cpp gives none (the formula answers then)."""
    if spec.rpc_servers:
        raise DryRunFailed("a dry run cannot reach RPC servers")
    from dataclasses import replace

    spec = replace(spec, contexts=1, threads=1)  # one context's buffers: a pool holds that many more of each
    path = cache_dir() / f"{dry_run_key(spec, digest)}.json"
    if use_cache:
        try:
            return DryRun.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    name = spec.path.name
    from .._proc import die_with_parent

    try:
        proc = subprocess.run([sys.executable, "-m", "orion_cli.engine.dryrun", json.dumps(spec_to_json(spec))],
                              capture_output=True, text=True, timeout=timeout, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as exc:
        raise DryRunFailed(f"llama.cpp's dry run of {name} took over {timeout:.0f} s") from exc
    except OSError as exc:
        raise DryRunFailed(f"llama.cpp's dry run of {name} could not start: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise DryRunFailed(f"llama.cpp's dry run of {name} failed: {last[:300]}")
    result = parse_log(proc.stdout)
    if not result.compute:
        raise DryRunFailed(f"llama.cpp's dry run of {name} reported no compute buffer")
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result.to_dict()))
            tmp.replace(path)
        except OSError:
            pass  # a cache that cannot be written costs a dry run next time, nothing else
    return result


class DryRunFailed(Exception):
    """llama.cpp's dry run gave no figures (the formula answers instead)."""


def _child(spec: LoadSpec) -> None:
    """In the child: the loader's own load of ``spec`` with no_alloc; llama.cpp's log to stdout."""
    import llama_cpp.llama_cpp as C

    from .loader import load

    if "no_alloc" not in {f[0] for f in C.llama_model_params._fields_}:  # else this would be a real load
        sys.stderr.write("this llama-cpp-python has no no_alloc: no dry run\n")
        os._exit(5)
    lines: list[str] = []
    try:
        load(spec, dry_run_log=lines)
    except Exception as exc:  # llama.cpp refused: its log says why
        sys.stdout.write("".join(lines))
        sys.stderr.write(f"{exc}\n")
        sys.stdout.flush()
        os._exit(3)
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
    os._exit(0)  # no teardown: nothing was allocated


if __name__ == "__main__":
    _child(spec_from_json(json.loads(sys.argv[1])))
