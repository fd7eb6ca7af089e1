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
_STDERR_FD: int | None = None


def _stderr_fd() -> int:
    """A copy of this process's stderr, taken before any load: llama-cpp-python points fd 1 and 2 at
    /dev/null while a model loads, and a server lost then must still be said."""
    global _STDERR_FD
    if _STDERR_FD is None:
        try:
            _STDERR_FD = os.dup(2)
        except OSError:
            return 2
    return _STDERR_FD
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


def _unreachable(endpoints, within: float = 2.0) -> list[str]:
    """The servers that have closed their connection with this process (its socket to them is in
    CLOSE_WAIT: the server's FIN came) or refuse a new one, looked for during ``within`` seconds: a
    server that dies closes its connections and its listening socket a moment apart. A connection
    that times out is a live server's full backlog (it serves one client at a time), not a gone one."""
    import socket
    import time

    deadline = time.monotonic() + within
    while True:
        gone = _endpoints_closed_by_peer(sorted(endpoints))
        for endpoint in sorted(endpoints):
            if endpoint in gone:
                continue
            host, _, port = endpoint.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=0.2).close()
            except ConnectionRefusedError:
                gone.append(endpoint)
            except OSError:
                pass
        if gone or time.monotonic() >= deadline:
            return sorted(gone)
        time.sleep(0.05)  # the process is ending: a bounded wait for the dead server's socket to close


def _catch_rpc_aborts() -> None:
    """llama.cpp's RPC client aborts the process when a server stops answering mid-run
    (``RPC_STATUS_ASSERT``: SIGABRT, a core dump). ggml calls its abort callback first: there,
    orion says so in one line and ends the process with the network exit code. Any other abort
    keeps ggml's own report."""
    global _ABORT_HANDLER
    if _ABORT_HANDLER is not None:
        return
    _stderr_fd()

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
        os.write(_stderr_fd(), (f"\nerror: {which} stopped answering mid-run (llama.cpp: {reason}): check that "
                     f"'orion rpc-server' still runs there and is reachable, then run this again\n").encode())
        os._exit(RPC_LOST_EXIT)

    _ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(on_abort)
    ggml().ggml_set_abort_callback(ctypes.cast(_ABORT_HANDLER, ctypes.c_void_p))


# ---------------------------------------------------------------- a server that stops answering

# How long a run on RPC servers may go without progress (a part of the load, a decode step) before
# orion gives up on them: llama.cpp's RPC client waits on its socket with no timeout of its own, so
# a server that is stopped (SIGSTOP, a machine that hangs) or a link that drops without closing
# would block the run for ever. ORION_RPC_TIMEOUT sets another.
RPC_TIMEOUT_S = 60.0
RPC_TIMEOUT_VAR = "ORION_RPC_TIMEOUT"
FIRST_STEP_FACTOR = 4  # the first decode of a prompt (a whole batch of its tokens) may take this much longer
SLOWEST_FACTOR = 10  # and no step is given up on before 10 times the slowest one seen (slow machines)


def rpc_timeout_s(environ=None) -> float:
    from ..rpc_endpoints import seconds_from_env

    return seconds_from_env(RPC_TIMEOUT_VAR, RPC_TIMEOUT_S, environ)


class StallWatchdog:
    """Ends this process with one line and the network exit code when work that has parts on RPC
    servers makes no progress for a while: the only way out of a thread blocked in llama.cpp's
    ``recv`` (it cannot be interrupted, and the server never answers).

    Progress is a :meth:`beat` (the load's progress callback: :meth:`beating`) or a change in a
    :meth:`watch` ed counter (the model's decode steps). The limit is ``timeout`` between marks,
    ``FIRST_STEP_FACTOR`` times it for the first decode step of a prompt, and never less than
    ``SLOWEST_FACTOR`` times the slowest decode step seen. It watches only while :meth:`armed` and
    while the model in use has parts on servers (:meth:`serve`): a REPL waiting for its user, or a
    model that fits here, is never timed."""

    def __init__(self, timeout: float, *, clock=None, on_stall=None, tick: float | None = None) -> None:
        import time

        self.timeout = timeout
        self.endpoints: tuple[str, ...] = ()
        self._clock = clock or time.monotonic
        self._on_stall = on_stall or end_stalled_run
        self._tick = tick if tick is not None else min(1.0, timeout / 10)
        self._counter: list | None = None  # [read, its last value]
        self._armed = False
        self._last = self._clock()
        self._first = False  # the first decode step after arming (or after a counter is added) is still to come
        self._slowest = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        _stderr_fd()  # now, before a load points fd 2 at /dev/null

    @classmethod
    def for_run(cls) -> StallWatchdog:
        """The CLI's, with ORION_RPC_TIMEOUT's limit (a bad value is one configuration error)."""
        return cls(rpc_timeout_s())

    def serve(self, endpoints) -> None:
        """The servers the model in use has parts on (none: nothing is timed)."""
        with self._lock:
            self.endpoints = tuple(dict.fromkeys(endpoints))
            self._last = self._clock()

    def beat(self) -> None:
        with self._lock:
            self._last = self._clock()

    def beating(self, callback=None):
        """``callback`` (a load's progress callback, or None) that also counts as progress."""
        def progress(value: float) -> None:
            self.beat()
            if callback is not None:
                callback(value)

        return progress

    def watch(self, read) -> None:
        """A counter whose every change is progress (``read()``: the decode steps of the model in use;
        it replaces the one watched before)."""
        with self._lock:
            self._counter = [read, read()]
            self._first = True
            self._last = self._clock()

    def armed(self):
        """A context manager: timed while inside (one answer)."""
        from contextlib import contextmanager

        @contextmanager
        def inside():
            with self._lock:
                self._armed, self._last, self._first = True, self._clock(), self._counter is not None
                if self._thread is None and self._tick > 0:  # (tick 0: checked by hand, as tests do)
                    self._thread = threading.Thread(target=self._run, name="orion-rpc-watchdog", daemon=True)
                    self._thread.start()
            try:
                yield self
            finally:
                with self._lock:
                    self._armed = False

        return inside()

    def limit(self) -> float:
        return max(self.timeout * (FIRST_STEP_FACTOR if self._first else 1), SLOWEST_FACTOR * self._slowest)

    def check(self) -> bool:
        """One look: progress noted, and True (after ``on_stall``) when the limit has passed."""
        with self._lock:
            if not self._armed or not self.endpoints:
                return False
            now = self._clock()
            counter = self._counter
            if counter is not None and counter[0]() != counter[1]:
                counter[1] = counter[0]()
                # the step took at most this long (seen a tick late at worst: less the tick)
                self._slowest = max(self._slowest, now - self._last - self._tick)
                self._last, self._first = now, False
            waited, limit, endpoints = now - self._last, self.limit(), self.endpoints
        if waited < limit:
            return False
        self._on_stall(endpoints, waited)
        return True

    def _run(self) -> None:
        while not self._closed.wait(self._tick):  # the watchdog's own pace, not a synchronisation
            if self.check():
                return

    def close(self) -> None:
        self._closed.set()


_CLOSE_WAIT = 8  # include/net/tcp_states.h: the peer closed its side


def _tcp_sockets() -> dict[str, tuple[str, int, int]]:
    """This machine's TCP sockets by inode: (peer address, peer port, state), from /proc/net/tcp{,6}."""
    import ipaddress

    out = {}
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            try:
                address, port = fields[2].split(":")
                raw = bytes.fromhex(address)
                if v6:  # four 32-bit words, each in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    ip = ipaddress.IPv6Address(raw)
                    ip = ip.ipv4_mapped or ip
                else:
                    ip = ipaddress.IPv4Address(raw[::-1])
                out[fields[9]] = (str(ip), int(port, 16), int(fields[3], 16))
            except ValueError:
                continue
    return out


def _socket_inode(fd: int) -> str | None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return target[8:-1] if target.startswith("socket:[") else None


def _matching(endpoints: Sequence[str], peers) -> list[str]:
    """Those of ``endpoints`` among (address, port) ``peers`` (a host name: by its port alone)."""
    hit = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        if any(p == int(port) and (a == host or not _is_address(host)) for a, p in peers):
            hit.append(endpoint)
    return hit


def _endpoints_closed_by_peer(endpoints: Sequence[str]) -> list[str]:
    """Those of ``endpoints`` that closed a connection of this process (in CLOSE_WAIT: Linux)."""
    tcp = _tcp_sockets()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    peers = set()
    for fd in fds:
        inode = _socket_inode(int(fd)) if fd.isdigit() else None
        if inode in tcp and tcp[inode][2] == _CLOSE_WAIT:
            peers.add(tcp[inode][:2])
    return _matching(endpoints, peers)


def _peers_of_blocked_sockets() -> set[tuple[str, int]]:
    """(address, port) of each TCP peer that a thread of this process waits on in a system call now
    (Linux: /proc/self/task/*/syscall names the call's first argument, the socket's descriptor)."""
    tcp = _tcp_sockets()
    found = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        try:
            call = Path(f"/proc/self/task/{task}/syscall").read_text().split()
            if len(call) < 2 or not call[0].isdigit():  # "running", or not in a system call
                continue
            inode = _socket_inode(int(call[1], 16))
        except (OSError, ValueError):
            continue
        if inode in tcp:
            found.add(tcp[inode][:2])
    return found


def stalled_endpoints(endpoints: Sequence[str]) -> list[str]:
    """Those of ``endpoints`` that a thread of this process is blocked on (its socket to them), or
    all of them when none can be told (not Linux, a host name that is not an address)."""
    return _matching(endpoints, _peers_of_blocked_sockets()) or list(endpoints)


def _is_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def end_stalled_run(endpoints: Sequence[str], waited: float) -> None:
    """The watchdog's verdict: the text so far flushed, one line naming the server, exit 6."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the process ends either way
        pass
    gone = stalled_endpoints(endpoints)
    which = f"RPC server{'s' if len(gone) > 1 else ''} {', '.join(gone)}"
    os.write(_stderr_fd(), (f"\nerror: {which} stopped answering: no progress for {waited:.0f} s ({RPC_TIMEOUT_VAR} sets "
                 f"the limit): check that 'orion rpc-server' still runs there and is reachable (a slower machine "
                 f"needs a larger {RPC_TIMEOUT_VAR}), then run this again\n").encode())
    os._exit(RPC_LOST_EXIT)
