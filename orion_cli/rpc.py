"""Other machines' memory, over llama.cpp's RPC backend: the servers, what each can hold, and the probe.

``orion rpc-server`` runs llama.cpp's RPC server on a helper machine; ``orion run MODEL --rpc
host:port[=SIZE],…`` (or ``rpc_servers`` in the strategy, ``ORION_RPC``) puts layers there. This
module is plain Python: it parses the server list, and asks each server, in llama.cpp's own RPC
protocol (``ggml/src/ggml-rpc/ggml-rpc.cpp``, version 7), how many devices it serves and how much
memory each has free, with a timeout, before llama.cpp connects. That matters: llama.cpp's client
aborts the process when a server cannot be reached, and a server busy with another client (it serves
one at a time) would make it wait forever. The probe turns both into one clear line.

A server's budget is its reported free memory under orion's high-pressure line (as for this
machine's RAM and each GPU), or the ``=SIZE`` given with it. (llama.cpp reports a CPU device's RAM
as all free — ggml-cpu has no better figure — so a CPU server's budget is its RAM × the line unless
``=SIZE`` says less.)
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ._once import MeasuredOnce
from .errors import NetworkError
from .rpc_endpoints import DEFAULT_PORT, RpcServer, RpcServerFailed  # noqa: F401 (the CLI's names)
from .units import format_bytes

# The protocol orion speaks to probe a server, and the one llama.cpp 0.3.36's RPC backend speaks
# (ggml-rpc.h: RPC_PROTO_MAJOR_VERSION; a test fails loudly when the engine's changes).
RPC_PROTO_MAJOR = 7
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CONN_CAPS = 24  # rpc_msg_hello_req: the transport capabilities (none: plain TCP)
PROBE_TIMEOUT_S = 5.0


class RpcError(NetworkError):
    """An RPC server cannot be reached, or does not answer as one."""


# ---------------------------------------------------------------- the probe


@dataclass(frozen=True)
class ServerMemory:
    """What a server reports for each device it serves: (free, total) bytes."""

    server: RpcServer
    version: tuple[int, int, int]
    devices: tuple[tuple[int, int], ...]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        data += chunk
    return bytes(data)


def _call(sock: socket.socket, cmd: int, payload: bytes, answer: int) -> bytes:
    """One request (| cmd: 1 byte | size: 8 bytes | payload |) and its answer (| size | data |)."""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    size, = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != answer:
        raise RpcError(f"unexpected answer size {size} (expected {answer})")
    return _recv_exact(sock, answer)


def probe(server: RpcServer, timeout: float = PROBE_TIMEOUT_S) -> ServerMemory:
    """Ask a server its protocol version, its devices and their memory (each step within ``timeout``)."""
    where = server.endpoint
    hint = f"start 'orion rpc-server --host {server.host} --port {server.port}' there, or check --rpc"
    try:
        sock = socket.create_connection((server.host, server.port), timeout=timeout)
    except socket.gaierror as exc:
        raise RpcError(f"RPC server {where}: unknown host ({exc.strerror or exc})", hint=hint) from None
    except socket.timeout:
        raise RpcError(f"RPC server {where} did not answer within {timeout:g} s", hint=hint) from None
    except OSError as exc:
        raise RpcError(f"cannot reach RPC server {where}: {exc.strerror or exc}", hint=hint) from None
    with sock:
        try:
            hello = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS), 4 + _CONN_CAPS)
            version = (hello[0], hello[1], hello[2])
            if version[0] != RPC_PROTO_MAJOR:
                raise RpcError(f"RPC server {where} speaks protocol {'.'.join(map(str, version))}, this llama.cpp "
                               f"speaks {RPC_PROTO_MAJOR}.x",
                               hint="run the same orion (and llama.cpp) version on every machine")
            count, = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for index in range(count):
                free, total = struct.unpack("<QQ", _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16))
                devices.append((free, total))
        except socket.timeout:
            raise RpcError(f"RPC server {where} accepted the connection but did not answer within {timeout:g} s",
                           hint="llama.cpp's RPC server serves one client at a time: is another orion (or "
                                "llama.cpp) using it? Stop that client, or start another server") from None
        except OSError as exc:
            raise RpcError(f"RPC server {where} closed the connection: {exc.strerror or exc}",
                           hint="is it an RPC server ('orion rpc-server')? Its version must match this one's") from None
    if not devices:
        raise RpcError(f"RPC server {where} serves no device", hint="restart it with 'orion rpc-server'")
    return ServerMemory(server, version, tuple(devices))


@dataclass(frozen=True)
class RemoteDevice:
    """One device of an RPC server, as the split planning sees it."""

    server: RpcServer
    index: int  # the device's number on its server
    free_bytes: int
    total_bytes: int
    budget_bytes: int
    budget_how: str

    @property
    def name(self) -> str:
        return f"RPC {self.server.endpoint}" + (f" #{self.index}" if self.index else "")

    def to_dict(self) -> dict:
        return {"endpoint": self.server.endpoint, "device": self.index, "free_bytes": self.free_bytes,
                "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes, "budget": self.budget_how}


def remote_devices(servers: Sequence[RpcServer], pressure_high: float,
                   probe: Callable[[RpcServer], ServerMemory] = probe) -> tuple[RemoteDevice, ...]:
    """Each server's devices with their budgets, in the order llama.cpp puts them (first the servers,
    in the order given; their devices in the servers' order). ``=SIZE`` is shared evenly between a
    server's devices; without it, a device's budget is its total × the high-pressure line minus
    what is in use there now, like this machine's."""
    from .budget import Budget

    out = []
    for server in servers:
        memory = probe(server)
        n = len(memory.devices)
        for index, (free, total) in enumerate(memory.devices):
            if server.budget_bytes is not None:
                budget = server.budget_bytes // n
                how = f"{format_bytes(server.budget_bytes)} given" + (f" / {n} devices" if n > 1 else "")
            else:
                b = Budget.compute(total, max(0, total - free), pressure_high)
                budget, how = b.budget_bytes, b.arithmetic()
                if free == total:  # ggml's CPU device reports all of its RAM as free
                    how += (" (the server reports its RAM as all free, as llama.cpp does for a CPU: "
                            "give =SIZE where that machine does other work)")
            out.append(RemoteDevice(server, index, free, total, budget, how))
    return tuple(out)


MEASURED: MeasuredOnce[tuple[RemoteDevice, ...]] = MeasuredOnce("each RPC server's devices and budgets")


def remote_devices_now(servers: Sequence[RpcServer], pressure_high: float) -> tuple[RemoteDevice, ...]:
    """:func:`remote_devices`, asked once a process: after this process has loaded a model there, a
    server's free memory no longer counts it (the manager does), and the server, which serves one
    client at a time, is this process's until it exits."""
    key = (",".join(str(s) for s in servers), pressure_high)
    return MEASURED.get(key, lambda: remote_devices(servers, pressure_high))


# ---------------------------------------------------------------- orion rpc-server

# What llama.cpp's RPC server prints (ggml-rpc.cpp, ggml_backend_rpc_start_server) that orion reports.
_ACCEPTED, _CLOSED = "Accepted client connection", "Client connection closed"


def start_server(host: str, port: int, threads: int, *, debug: bool = False):
    """llama.cpp's RPC server for this machine's GPUs (its CPU where it has none), in a child process
    that dies with this one. Its output (stdout and stderr together) is a pipe the caller reads."""
    import subprocess

    from ._proc import die_with_parent
    from .engine.children import rpc_server_command

    import os

    from ._proc import ErrorChannel

    env = dict(os.environ, ORION_DEBUG="1") if debug else None
    channel = ErrorChannel()
    try:
        proc = subprocess.Popen(rpc_server_command(host, port, threads), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                                bufsize=1, preexec_fn=die_with_parent, **channel.popen_kwargs(env))
    except BaseException:
        channel.close()
        raise
    channel.started()
    proc.orion_errors = channel  # what the child reports when it fails (wait_ready, the CLI)
    return proc


def check_port_free(host: str, port: int) -> None:
    """Refuse at once (before starting llama.cpp) a port that another process listens on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RpcServerFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                  hint="choose another --port, or --host an address of this machine") from None


def wait_ready(server: RpcServer, proc, timeout: float = 60.0, clock: Callable[[], float] | None = None,
               pause: Callable[[float], None] | None = None) -> ServerMemory:
    """Probe the child's endpoint until it answers (or the child exits: its last words in the error)."""
    import time

    clock = clock or time.monotonic
    pause = pause or time.sleep
    deadline = clock() + timeout
    while True:
        if proc.poll() is not None:
            said = (proc.stdout.read() or "").strip().splitlines() if proc.stdout else []
            last = next((line for line in reversed(said) if line.strip()), "")
            channel = getattr(proc, "orion_errors", None)
            reported = channel.error() if channel is not None else None
            if reported is not None:  # the child's own error (RpcUnsupported, ...), its class kept
                raise reported
            raise RpcServerFailed(f"llama.cpp's RPC server did not start on {server.endpoint}: "
                                  f"{last or f'exit status {proc.returncode}'}",
                                  hint="run with --debug for llama.cpp's log")
        try:
            return probe(server, timeout=2.0)
        except RpcError:
            if clock() > deadline:
                raise RpcServerFailed(f"llama.cpp's RPC server did not answer on {server.endpoint} within "
                                      f"{timeout:g} s", hint="run with --debug for llama.cpp's log") from None
            pause(0.05)


def server_events(lines: Iterable[str], skip_probe: bool = True) -> Iterable[str]:
    """What the server's output means for a person: 'client connected' / 'client disconnected'
    (the readiness probe's pair left out); other lines as they are."""
    skipping = 2 if skip_probe else 0
    for line in lines:
        text = line.rstrip("\n")
        if text.startswith((_ACCEPTED, _CLOSED)):
            if skipping:
                skipping -= 1
                continue
            yield "client connected" if text.startswith(_ACCEPTED) else "client disconnected"
        elif text.strip():
            yield text
