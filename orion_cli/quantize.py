"""Quantize a GGUF to any type llama.cpp makes without an importance matrix.

The quantizer runs in a child process (``python -m orion_cli.engine.children quantize``):
llama.cpp's logs stay out of the terminal, Ctrl-C stops it at once, and a
crash cannot take orion down. The output is written under a temporary name and
renamed only once its header says the type that was asked for: no half file
is ever left under the output name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DoesNotFit, Interrupted, InvalidValue, NotAGGUF, child_failure
from .gguf_header import GGML_TYPES, read_local_header
from .units import format_bytes

UNQUANTIZED = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class QuantizeResult:
    src: Path
    dst: Path
    type_name: str
    src_bytes: int
    dst_bytes: int
    seconds: float
    requantized: bool

    @property
    def ratio(self) -> float:
        return self.dst_bytes / self.src_bytes if self.src_bytes else 0.0


def resolve_type(name: str) -> str:
    from .quant_types import LEVEL_TYPE, NEEDS_IMATRIX, QUANTIZABLE

    upper = name.strip().upper()
    if name.strip().lower() in LEVEL_TYPE:
        return LEVEL_TYPE[name.strip().lower()]
    if upper in QUANTIZABLE:
        return upper
    if upper in NEEDS_IMATRIX:
        raise InvalidValue(f"{upper} needs an importance matrix, which llama-cpp-python does not let orion pass",
                           hint="choose IQ4_XS, Q3_K_S or Q2_K, or make it with llama.cpp's llama-quantize --imatrix")
    raise InvalidValue(f"--to {name!r} is not a quantization type",
                       hint=f"use a level (q4, q8, q16, q32) or one of {', '.join(QUANTIZABLE)}")


def parse_ladder(text: str) -> list[str]:
    """The types of a comma-separated ladder (levels or types), each once, in the order given."""
    types = [resolve_type(t) for t in text.split(",") if t.strip()]
    if not types:
        raise InvalidValue("--ladder is empty", hint="for example --ladder Q4_K_M,Q8_0,F16")
    return list(dict.fromkeys(types))


def _bytes_per_weight(type_name: str) -> float:
    from .quant_types import MAIN_TENSOR_TYPE

    base = MAIN_TENSOR_TYPE.get(type_name, type_name)
    for name, block, size in GGML_TYPES.values():
        if name == base:
            return size / block
    return 4.0


def quantize(
    src: Path,
    dst: Path,
    type_name: str,
    *,
    threads: int,
    force: bool = False,
    allow_requantize: bool = False,
    on_tick: Callable[[float], None] | None = None,
    on_requantize: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize ``src`` into ``dst`` (checked, atomic); see the module docstring."""
    import time

    from .engine import quantize_command

    type_name = resolve_type(type_name)
    src, dst = Path(src), Path(dst)
    header = read_local_header(src)  # missing, non-GGUF, truncated: a clean error before llama.cpp
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidValue(f"the output {dst} is the input", hint="write to another file with -o")
    if dst.exists() and not force:
        raise InvalidValue(f"{dst} already exists", hint="choose another -o, or add --force to replace it")
    if dst.is_dir():
        raise InvalidValue(f"{dst} is a directory", hint="-o takes a file name")
    requant = header.file_type not in UNQUANTIZED
    if requant and not allow_requantize:
        raise InvalidValue(f"{src.name} is already quantized ({header.file_type}); quantizing it again loses quality "
                           f"twice", hint="quantize from an F16/F32 file, or add --allow-requantize")
    expected = int(header.n_params * _bytes_per_weight(type_name) * 1.1) + (16 << 20)
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < expected:
        raise DoesNotFit(f"{type_name} of {src.name} needs about {format_bytes(expected)}, {format_bytes(free)} is free "
                         f"at {dst.parent}", hint="free some space or write elsewhere with -o")
    if requant and on_requantize:
        on_requantize(header.file_type)  # every check passed: it really happens
    from ._debug import debug_enabled
    from ._proc import ErrorChannel, die_with_parent, remove_stale_partials

    remove_stale_partials(dst.parent, dst.name)  # what a killed run left behind
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    debug = debug_enabled()
    start = time.perf_counter()
    channel = ErrorChannel()
    # llama.cpp's log goes to a file, read once the child is done: a pipe read only then fills up
    # (64 KiB: a model of ~420 tensors) and the child would block on it for ever
    log = None if debug else tempfile.TemporaryFile(mode="w+", errors="replace")
    try:
        proc = subprocess.Popen(quantize_command(src, tmp, type_name, threads, allow_requantize),
                                stdout=None if debug else subprocess.DEVNULL, stderr=log, text=True,
                                start_new_session=True, preexec_fn=die_with_parent, **channel.popen_kwargs())
    except BaseException:
        channel.close()
        if log is not None:
            log.close()
        raise
    channel.started()
    try:
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if on_tick:
                    on_tick(time.perf_counter() - start)
        err = ""
        if log is not None:
            log.seek(0)
            err = log.read()
        if proc.returncode != 0:
            last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
            if shutil.disk_usage(dst.parent).free < (16 << 20) or "No space left" in err:
                raise DoesNotFit(f"the disk filled up while writing {type_name} of {src.name} at {dst.parent}",
                                 hint="free some space or write elsewhere with -o; nothing was kept")
            if proc.returncode < 0:
                raise child_failure(proc.returncode, f"quantizing {src.name} to {type_name}")
            reported = channel.error()  # the child's own error, its class kept
            if reported is None:
                raise child_failure(proc.returncode, f"quantizing {src.name} to {type_name}", last)
            if last and isinstance(reported, NotAGGUF):
                reported.message += f": {last}"
            raise reported
        got = read_local_header(tmp).file_type
        if got != type_name:
            raise NotAGGUF(f"llama.cpp wrote {got}, not {type_name}", hint="this model's tensors may not allow it")
        os.replace(tmp, dst)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise Interrupted("quantization stopped; no output was written", hint="run it again") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        channel.close()
        if log is not None:
            log.close()
        tmp.unlink(missing_ok=True)
    return QuantizeResult(src, dst, type_name, header.file_size or src.stat().st_size, dst.stat().st_size,
                          time.perf_counter() - start, requant)


def quant_cache_path(src: Path, type_name: str) -> Path:
    """Where ``eval --ladder`` keeps ``src`` quantized to ``type_name``: ``$ORION_HOME/cache/quant``,
    keyed by the source's path, size and modification time (a changed source is quantized again)."""
    import hashlib

    from .paths import orion_home

    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return orion_home() / "cache" / "quant" / f"{src.stem}-{key}-{type_name}.gguf"


def ladder_file(src: Path, type_name: str, make: Callable[[Path], None]) -> Path:
    """``src`` itself when it is ``type_name``, else its cached quantization, made by ``make(out)``
    when it is not there yet (quantize writes atomically: a file there is complete)."""
    if read_local_header(src).file_type == type_name:
        return src
    out = quant_cache_path(src, type_name)
    if not out.exists():
        make(out)
    return out
