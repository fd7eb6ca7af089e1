"""The engine health check: does llama.cpp's default setup survive a quantized decode here?

On Intel Xeons with AMX inside a VM, llama.cpp's extra buffer types (weight
repacking, the AMX path among them) kill the process with SIGSEGV at the first
decode of a quantized model (llama.cpp issue #20824, PR #26954; ollama #17249).
A canary child process (``python -m orion_cli.engine.children canary``) loads a tiny
random-weight Q4_0 model and decodes a few tokens with the default settings; if
it dies by a signal, a second child tries the safe settings
(``use_extra_bufts = False``). The verdict is cached per engine build and CPU.

This module imports nothing heavy, so ``orion profile`` can read the cached
verdict within its start-up budget; the children import llama_cpp.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import OrionError
from .paths import orion_home


class EngineCrashed(OrionError):
    """Both the default and the safe settings crashed the canary."""


@dataclass(frozen=True)
class EngineCheck:
    """What the canary found for this engine build on this CPU."""

    key: str
    use_extra_bufts: bool
    default_ok: bool
    default_signal: str | None
    tok_s_default: float | None
    tok_s_safe: float | None
    checked_at: str = ""
    # what llama.cpp's CPU backend was built with (llama_print_system_info: AVX2, AMX_INT8, OPENMP...)
    features: tuple[str, ...] = ()

    @property
    def amx(self) -> bool:
        """Whether ggml's AMX kernels are in use: built in, and the default settings (which
        enable them) survive here."""
        return self.default_ok and "AMX_INT8" in self.features

    @property
    def gpu_offload(self) -> bool:
        """Whether this build can put layers on a GPU (llama_supports_gpu_offload)."""
        return "GPU_OFFLOAD" in self.features

    @property
    def rpc(self) -> bool:
        """Whether this build has llama.cpp's RPC backend (llama_supports_rpc)."""
        return "RPC" in self.features

    def verdict(self) -> str:
        if self.default_ok:
            return "llama.cpp's default settings work"
        return (f"default settings crash ({self.default_signal}); using the safe settings "
                f"(use_extra_bufts off)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict) -> "EngineCheck":
        return cls(**(entry | {"features": tuple(entry.get("features", ()))}))


def engine_key(cpu_model: str, cpu_flags: Sequence[str]) -> str:
    """Identifies the engine build and the CPU, without importing llama_cpp (it costs 0.3 s)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    build = "none"
    if spec and spec.submodule_search_locations:
        lib_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
        libs = sorted(lib_dir.glob("libllama*")) + sorted(lib_dir.glob("llama*.dll"))
        if libs:
            st = libs[0].stat()
            build = f"{st.st_size}-{int(st.st_mtime)}"
    return f"llama:{build}|cpu:{cpu_model}|{'+'.join(cpu_flags)}"


def _cache_path() -> Path:
    return orion_home() / "engine-check.json"


def cached_check(key: str) -> EngineCheck | None:
    try:
        doc = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return None
    entry = doc.get(key)
    if not isinstance(entry, dict) or "features" not in entry:
        return None  # none, or from an orion that did not record the build's features: check again
    try:
        return EngineCheck.from_dict(entry)
    except TypeError:
        return None


def _store_check(check: EngineCheck) -> None:
    from ._fs import write_text_atomic

    try:
        doc = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        doc = {}
    doc[check.key] = check.to_dict()
    write_text_atomic(_cache_path(), json.dumps(doc, indent=2) + "\n")


def canary_command(model: Path, safe: bool) -> list[str]:
    return [sys.executable, "-m", "orion_cli.engine.children", "canary", str(model), "safe" if safe else "default"]


def _run_canary(cmd: list[str]) -> tuple[bool, str | None, float | None, tuple[str, ...]]:
    """Run one canary child: (survived, signal name if it died by one, tok/s, the build's features)."""
    import signal
    import subprocess

    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False, "timeout", None, ()
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return False, name, None, ()
    if done.returncode != 0:
        return False, f"exit {done.returncode}", None, ()
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return True, None, float(result["tok_s"]), tuple(result.get("features", ()))
    except (ValueError, KeyError, IndexError, TypeError):
        return False, "no result", None, ()


def check_engine(
    key: str,
    *,
    force: bool = False,
    command: Callable[[Path, bool], list[str]] = canary_command,
) -> EngineCheck:
    """The cached verdict for this engine and CPU, or a fresh one from the canary children."""
    if not force:
        cached = cached_check(key)
        if cached is not None:
            return cached
    import tempfile

    from ._fs import now_iso

    with tempfile.TemporaryDirectory(prefix="orion-canary-") as tmp:
        model = Path(tmp) / "canary-q4_0.gguf"  # the first child writes it (gguf and numpy stay out of here)
        ok, sig, tok_default, features = _run_canary(command(model, False))
        safe_ok, safe_sig, tok_safe, safe_features = _run_canary(command(model, True))
    if not ok and not safe_ok:
        raise EngineCrashed(
            f"llama.cpp crashes on this machine with default and safe settings ({sig}; {safe_sig})",
            hint="reinstall llama-cpp-python built for this CPU, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF'",
        )
    check = EngineCheck(key=key, use_extra_bufts=ok, default_ok=ok, default_signal=sig,
                        tok_s_default=tok_default, tok_s_safe=tok_safe, checked_at=now_iso(),
                        features=features or safe_features)
    _store_check(check)
    return check


def current_check() -> EngineCheck:
    """The verdict for this machine: cached, or found now (first use with no profile)."""
    from .device import cpu_info

    model, flags, _ = cpu_info()
    return check_engine(engine_key(model, flags))
