"""ggml's RPC backend through ctypes: other machines' devices for a load, this machine's GPUs, and the
abort that llama.cpp's RPC client raises when a server goes away, turned into one line."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

from ..errors import EXIT_NETWORK

_GGML = None
DEV_CPU, DEV_GPU = 0, 1  # enum ggml_backend_dev_type


def ggml():
    """ggml's backend registry, in the very copy libllama uses: ``lib/libggml.so.0``, its soname.
    The wheel holds libggml.so, .so.0 and .so.0.25.3 as three copies of one file; opening another
    loads a second registry, and devices found there are silently ignored (measured: every layer
    stayed on the CPU)."""
    global _GGML
    if _GGML is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
        p, c = ctypes.c_void_p, ctypes.c_char_p
        for name, res, args in (("ggml_backend_reg_by_name", p, [c]), ("ggml_backend_reg_get_proc_address", p, [p, c]),
                                ("ggml_backend_reg_dev_count", ctypes.c_size_t, [p]),
                                ("ggml_backend_reg_dev_get", p, [p, ctypes.c_size_t]),
                                ("ggml_backend_dev_count", ctypes.c_size_t, []),
                                ("ggml_backend_dev_get", p, [ctypes.c_size_t]),
                                ("ggml_backend_dev_type", ctypes.c_int, [p]),
                                ("ggml_backend_dev_by_type", p, [ctypes.c_int]),
                                ("ggml_backend_dev_backend_reg", p, [p]),
                                ("ggml_backend_reg_name", c, [p]),
                                ("ggml_set_abort_callback", p, [p])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _GGML = lib
    return _GGML


def rpc_supported() -> bool:
    """Whether this llama.cpp was built with its RPC backend (-DGGML_RPC=ON)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def rpc_proc(name: bytes, prototype):
    lib = ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name) if reg else None
    if not address:
        from ..rpc_endpoints import rpc_unsupported

        raise rpc_unsupported()
    return prototype(address)


def rpc_devices(endpoints: Sequence[str]) -> list[int]:
    """The devices of RPC servers (``host:port``), as llama.cpp's ``--rpc`` finds them. Probe the
    servers first (:func:`orion_cli.rpc.probe`): llama.cpp aborts the process on one it cannot reach."""
    add = rpc_proc(b"ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    lib = ggml()
    _catch_rpc_aborts()
    found = []
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        found += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg) if reg else 0)]
    return found


def local_gpu_devices() -> list[int]:
    """This machine's GPUs (not RPC servers' devices), in llama.cpp's order."""
    lib = ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) == DEV_GPU and \
                lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) != b"RPC":
            out.append(dev)
    return out


_ABORT_HANDLER = None
# the RPC servers of the models loaded now (a count each): a lost connection is looked for among these
_IN_USE: dict[str, int] = {}
_IN_USE_LOCK = threading.Lock()
RPC_LOST_EXIT = EXIT_NETWORK


def track(endpoints: Sequence[str]) -> None:
    """A model loaded on these servers."""
    with _IN_USE_LOCK:
        for e in endpoints:
            _IN_USE[e] = _IN_USE.get(e, 0) + 1


def untrack(endpoints: Sequence[str]) -> None:
    """That model closed."""
    with _IN_USE_LOCK:
        for e in endpoints:
            if _IN_USE.get(e, 0) <= 1:
                _IN_USE.pop(e, None)
            else:
                _IN_USE[e] -= 1


def endpoints_in_use() -> list[str]:
    with _IN_USE_LOCK:
        return sorted(_IN_USE)


def _unreachable(endpoints) -> list[str]:
    """The servers that no longer accept a connection (one still serving this process accepts it)."""
    import socket

    gone = []
    for endpoint in sorted(endpoints):
        host, _, port = endpoint.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except OSError:
            gone.append(endpoint)
    return gone


def _catch_rpc_aborts() -> None:
    """llama.cpp's RPC client aborts the process when a server stops answering mid-run
    (``RPC_STATUS_ASSERT``: SIGABRT, a core dump). ggml calls its abort callback first: there,
    orion says so in one line and ends the process with the network exit code. Any other abort
    keeps ggml's own report."""
    global _ABORT_HANDLER
    if _ABORT_HANDLER is not None:
        return

    def on_abort(message: bytes) -> None:
        text = (message or b"").decode(errors="replace").strip()
        if "rpc" not in text.lower():  # "ggml-rpc.cpp:354: Remote RPC server crashed or ..."
            sys.stderr.write(text + "\n")
            return
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - the process ends either way
            pass
        reason = text.split(": ", 1)[-1].strip()
        gone = _unreachable(endpoints_in_use())
        which = f"the RPC server {', '.join(gone)}" if gone else "an RPC server"
        os.write(2, (f"\nerror: {which} stopped answering mid-run (llama.cpp: {reason}): check that "
                     f"'orion rpc-server' still runs there and is reachable, then run this again\n").encode())
        os._exit(RPC_LOST_EXIT)

    _ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(on_abort)
    ggml().ggml_set_abort_callback(ctypes.cast(_ABORT_HANDLER, ctypes.c_void_p))
