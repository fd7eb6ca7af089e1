"""The child processes that run llama.cpp where a native fault must not end orion: the engine check's
canary, the quantizer and ``orion rpc-server``'s server. ``python -m orion_cli.engine.children KIND ...``.

A child that fails for a reason orion knows reports it as a typed error (class, message, hint) on
the file descriptor named by ``ORION_ERROR_FD`` (:func:`orion_cli._proc.error_channel`); the parent
raises the same class. A child killed by a signal is told apart by its exit status
(:func:`orion_cli.errors.child_failure`).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path

from .._debug import debug_enabled
from .._proc import report_error
from ..errors import NotAGGUF, OrionError
from ._binding import model_params
from .logs import route_llama_log

CANARY_TOKENS = 32


def canary_child(model: str, mode: str) -> None:
    """In the canary child: load with the given settings, decode, print tok/s as JSON."""
    if not Path(model).exists():
        from ..tinymodel import write_tiny_llama

        write_tiny_llama(Path(model))
    with model_params(use_extra_bufts=(mode != "safe")):
        from llama_cpp import Llama

        llm = Llama(model, n_ctx=256, n_threads=min(4, os.cpu_count() or 1), verbose=False, seed=0)
    start = time.perf_counter()
    out = llm("the", max_tokens=CANARY_TOKENS, temperature=0.0)
    n = max(1, out["usage"]["completion_tokens"])
    print(json.dumps({"tok_s": n / (time.perf_counter() - start), "features": build_features()}))


def build_features() -> list[str]:
    """What llama.cpp's CPU backend was built with and found here ("AVX2", "AMX_INT8", "OPENMP"...)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = [name.strip() for part in info.split("|") if "=" in part
                for name, value in [part.rsplit("=", 1)] if value.strip() == "1"
                for name in [name.split(":")[-1]]]
    if llama_cpp.llama_supports_gpu_offload():  # a CUDA (or other GPU) backend is built in
        features.append("GPU_OFFLOAD")
    if llama_cpp.llama_supports_rpc():  # the RPC backend (orion rpc-server, --rpc)
        features.append("RPC")
    return features


# ---------------------------------------------------------------- quantization


def quantize_command(src: Path, dst: Path, type_name: str, threads: int, allow_requantize: bool) -> list[str]:
    return [sys.executable, "-m", "orion_cli.engine.children", "quantize", str(src), str(dst), type_name,
            str(threads), "1" if allow_requantize else "0"]


def quantize_child(src: str, dst: str, type_name: str, threads: str, allow: str) -> None:
    """In the quantize child: llama_model_quantize; a failure is a typed error."""
    import llama_cpp

    from ..quant_types import FILE_TYPE_IDS

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPE_IDS[type_name]
    params.nthread = int(threads)
    params.allow_requantize = allow == "1"
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if status != 0:
        raise NotAGGUF(f"llama.cpp could not quantize {Path(src).name} to {type_name} (status {status})",
                       hint="run with --debug to see llama.cpp's log")


# ---------------------------------------------------------------- orion rpc-server


def rpc_server_command(host: str, port: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "orion_cli.engine.children", "rpc-server", host, str(port), str(threads)]


def rpc_server_child(host: str, port: str, threads: str) -> None:
    """In the rpc-server child: llama.cpp's RPC server for this machine's GPUs, or its CPU where it
    has none, on host:port; blocks while it serves."""
    import llama_cpp

    from ..rpc_endpoints import RpcServerFailed, rpc_unsupported
    from . import ggml_rpc

    if not llama_cpp.llama_supports_rpc():
        raise rpc_unsupported()
    llama_cpp.llama_backend_init()
    route_llama_log(debug_enabled())
    start = ggml_rpc.rpc_proc(b"ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)))
    devices = ggml_rpc.local_gpu_devices() or [ggml_rpc.ggml().ggml_backend_dev_by_type(ggml_rpc.DEV_CPU)]
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(f"{host}:{port}".encode(), None, int(threads), len(devices), array)
    raise RpcServerFailed(f"llama.cpp's RPC server stopped serving on {host}:{port}",
                          hint="its log (--debug) says why")


CHILDREN = {"canary": (canary_child, 2), "quantize": (quantize_child, 5), "rpc-server": (rpc_server_child, 3)}


def main(argv: list[str]) -> int:
    kind = argv[0] if argv else ""
    if kind not in CHILDREN or len(argv) - 1 != CHILDREN[kind][1]:
        print("usage: python -m orion_cli.engine.children canary MODEL default|safe"
              " | quantize IN OUT TYPE THREADS 0|1 | rpc-server HOST PORT THREADS", file=sys.stderr)
        return 2
    from .._proc import ERROR_FD_VAR

    # the channel is this process's own: a process it starts must not write into whatever that fd is there
    channel = os.environ.pop(ERROR_FD_VAR, "")
    try:
        CHILDREN[kind][0](*argv[1:])
    except OrionError as exc:
        report_error(exc, channel)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
