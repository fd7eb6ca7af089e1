"""Other machines' memory, over llama.cpp's RPC backend: the servers, what each can hold, and the probe.

``orion rpc-server`` runs llama.cpp's RPC server on a helper machine; ``orion run MODEL --rpc
host:port[=SIZE],…`` (or ``rpc_servers`` in the strategy, ``ORION_RPC``) puts layers there. This
module is plain Python: it parses the server list, and asks each server, in llama.cpp's own RPC
protocol (``ggml/src/ggml-rpc/ggml-rpc.cpp``, version 7), how many devices it serves and how much
memory each has free, before llama.cpp connects: every server at once, each within one deadline from
its connection to its last answer (5 s; ``ORION_RPC_PROBE_TIMEOUT``), every count and size it answers
bounded. That matters: llama.cpp's client aborts the process when a server cannot be reached, and a
server busy with another client (it serves one at a time) would make it wait forever. The probe
turns both, and a peer that is no RPC server at all, into one clear line naming the server.

A server's budget is its reported free memory under orion's high-pressure line (as for this
machine's RAM and each GPU), or the ``=SIZE`` given with it. (llama.cpp reports a CPU device's RAM
as all free — ggml-cpu has no better figure — so a CPU server's budget is its RAM × the line unless
``=SIZE`` says less.)
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from ._once import MeasuredOnce
from .errors import EXIT_NETWORK, DoesNotFit, NetworkError
from .rpc_endpoints import DEFAULT_PORT, RpcServer, RpcServerFailed, seconds_from_env  # noqa: F401 (the CLI's names)
from .units import format_bytes

# The protocol orion speaks to probe a server, and the one llama.cpp 0.3.36's RPC backend speaks
# (ggml-rpc.h: RPC_PROTO_MAJOR_VERSION; a test fails loudly when the engine's changes).
RPC_PROTO_MAJOR = 7
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CONN_CAPS = 24  # rpc_msg_hello_req: the transport capabilities (none: plain TCP)
# The probe of one server, from the connection to its last answer, ends within this (seconds;
# ORION_RPC_PROBE_TIMEOUT sets another). Servers are probed side by side: N servers, one deadline.
PROBE_TIMEOUT_S = 5.0
PROBE_TIMEOUT_VAR = "ORION_RPC_PROBE_TIMEOUT"
# The most devices a server may claim: past this it is a bad answer, not a machine (each device is
# one more round trip: a peer claiming 2**31-1 kept the probe going for ever).
MAX_DEVICES = 64


class RpcError(NetworkError):
    """An RPC server cannot be reached, or does not answer as one."""


class RpcServerUnavailable(DoesNotFit):
    """A model needs an RPC server that cannot be used now (unreachable, busy, not an RPC server):
    it does not fit without it. HTTP 507 like any model that does not fit; the CLI's exit code is
    the network's (6), as for any unreachable server."""

    exit_code = EXIT_NETWORK


def probe_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """How long the probe of one server may take, from connecting to the last answer."""
    return seconds_from_env(PROBE_TIMEOUT_VAR, PROBE_TIMEOUT_S, environ)


# ---------------------------------------------------------------- the probe


@dataclass(frozen=True)
class ServerMemory:
    """What a server reports for each device it serves: (free, total) bytes."""

    server: RpcServer
    version: tuple[int, int, int]
    devices: tuple[tuple[int, int], ...]


class _Closed(Exception):
    """The server closed the connection in the middle of an answer."""


class _Unexpected(Exception):
    """An answer no RPC server gives (its size field says so)."""


class _Conversation:
    """Requests and answers on one connection, every read and write within one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.received = sock, deadline, 0

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.sock.settimeout(left)
        return left

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            self._left()
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise _Closed()
            data += chunk
            self.received += len(chunk)
        return bytes(data)

    def call(self, cmd: int, payload: bytes, answer: int) -> bytes:
        """One request (| cmd: 1 byte | size: 8 bytes | payload |) and its answer (| size | data |),
        whose size must be ``answer``: nothing past it is ever read."""
        self._left()
        self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
        size, = struct.unpack("<Q", self._recv_exact(8))
        if size != answer:
            raise _Unexpected(f"an answer of {size} bytes where {answer} were expected")
        return self._recv_exact(answer)


def probe(server: RpcServer, timeout: float | None = None) -> ServerMemory:
    """Ask a server its protocol version, its devices and their memory, all within ``timeout``
    seconds (default :func:`probe_timeout_s`) from the connection to the last answer."""
    timeout = probe_timeout_s() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    where = server.endpoint
    hint = f"start 'orion rpc-server --host {server.host} --port {server.port}' there, or check --rpc"
    not_rpc = "is it an RPC server ('orion rpc-server')? Its version must match this one's"
    try:
        sock = socket.create_connection((server.host, server.port), timeout=timeout)
    except socket.gaierror as exc:
        raise RpcError(f"RPC server {where}: unknown host ({exc.strerror or exc})", hint=hint) from None
    except TimeoutError:
        raise RpcError(f"RPC server {where} did not answer within {timeout:g} s", hint=hint) from None
    except OSError as exc:
        raise RpcError(f"cannot reach RPC server {where}: {exc.strerror or exc}", hint=hint) from None
    talk = _Conversation(sock, deadline)
    with sock:
        try:
            hello = talk.call(_CMD_HELLO, bytes(_CONN_CAPS), 4 + _CONN_CAPS)
            version = (hello[0], hello[1], hello[2])
            if version[0] != RPC_PROTO_MAJOR:
                raise RpcError(f"RPC server {where} speaks protocol {'.'.join(map(str, version))}, this llama.cpp "
                               f"speaks {RPC_PROTO_MAJOR}.x",
                               hint="run the same orion (and llama.cpp) version on every machine")
            count, = struct.unpack("<I", talk.call(_CMD_DEVICE_COUNT, b"", 4))
            if count > MAX_DEVICES:
                raise RpcError(f"RPC server {where} says it serves {count} devices (at most {MAX_DEVICES} make "
                               f"sense): not an RPC server orion understands", hint=not_rpc)
            devices = []
            for index in range(count):
                free, total = struct.unpack("<QQ", talk.call(_CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16))
                devices.append((free, total))
        except TimeoutError:
            if talk.received:
                raise RpcError(f"RPC server {where} did not finish answering within {timeout:g} s "
                               f"({talk.received} bytes came)",
                               hint="a link that slow cannot carry a model's layers; " + not_rpc) from None
            raise RpcError(f"RPC server {where} accepted the connection but did not answer within {timeout:g} s",
                           hint="llama.cpp's RPC server serves one client at a time: is another orion (or "
                                "llama.cpp) using it? Stop that client, or start another server") from None
        except _Closed:
            raise RpcError(f"RPC server {where} closed the connection in the middle of the probe "
                           f"(after {talk.received} bytes)", hint=not_rpc) from None
        except _Unexpected as exc:
            raise RpcError(f"RPC server {where} does not answer as llama.cpp's RPC server does ({exc})",
                           hint=not_rpc) from None
        except OSError as exc:
            raise RpcError(f"RPC server {where} closed the connection: {exc.strerror or exc}", hint=not_rpc) from None
    if not devices:
        raise RpcError(f"RPC server {where} serves no device", hint="restart it with 'orion rpc-server'")
    return ServerMemory(server, version, tuple(devices))


_probe_server = probe  # (probe_all's argument of that name is another)

# How long past its deadline a probe's thread is waited for (a probe ends at its deadline: this
# covers a host name whose DNS look-up hangs, which no socket timeout bounds).
_PROBE_GRACE_S = 1.0


def probe_all(servers: Sequence[RpcServer], probe: Callable[[RpcServer], ServerMemory] | None = None,
              timeout: float | None = None) -> list[ServerMemory | RpcError]:
    """Each server's answer (or its error), in the order given, probed side by side: however many
    servers, the whole takes one probe's deadline (``timeout``, default :func:`probe_timeout_s`)."""
    timeout = probe_timeout_s() if timeout is None else timeout
    ask = probe or (lambda s: _probe_server(s, timeout))
    results: list[ServerMemory | BaseException | None] = [None] * len(servers)

    def one(i: int, server: RpcServer) -> None:
        try:
            results[i] = ask(server)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, s), name=f"orion-rpc-probe-{s.endpoint}", daemon=True)
               for i, s in enumerate(servers)]
    for t in threads:
        t.start()
    give_up = time.monotonic() + timeout + _PROBE_GRACE_S
    for t in threads:
        t.join(max(0.0, give_up - time.monotonic()))
    out: list[ServerMemory | RpcError] = []
    for server, thread, result in zip(servers, threads, results):
        if thread.is_alive() or result is None:  # left behind: it ends on its own (a daemon thread)
            out.append(RpcError(f"RPC server {server.endpoint} did not answer within {timeout:g} s",
                                hint="check the host name and the network, or --rpc"))
        elif isinstance(result, (ServerMemory, RpcError)):
            out.append(result)
        else:
            raise result  # a bug, or Ctrl-C: not the server's doing
    return out


def one_error(failed: Sequence[RpcError]) -> RpcError:
    """Several servers' errors as one line: the first in full, the others named."""
    first = failed[0]
    if len(failed) == 1:
        return first
    others = ", ".join(e.message for e in failed[1:])
    return RpcError(f"{first.message} (and {len(failed) - 1} more: {others})", hint=first.hint)


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


def server_devices(server: RpcServer, memory: ServerMemory, pressure_high: float) -> list[RemoteDevice]:
    """A server's devices with their budgets: ``=SIZE`` is shared evenly between them; without it, a
    device's budget is its total × the high-pressure line minus what is in use there now, like
    this machine's."""
    from .budget import Budget

    out = []
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
    return out


def usable_devices(servers: Sequence[RpcServer], pressure_high: float,
                   probe: Callable[[RpcServer], ServerMemory] | None = None
                   ) -> tuple[tuple[RemoteDevice, ...], tuple[RpcError, ...]]:
    """The devices of the servers that answered, in the order llama.cpp puts them (the servers in
    the order given, their devices in each server's order), and the errors of those that did not."""
    devices: list[RemoteDevice] = []
    failed: list[RpcError] = []
    for server, result in zip(servers, probe_all(servers, probe)):
        if isinstance(result, RpcError):
            failed.append(result)
        else:
            devices += server_devices(server, result, pressure_high)
    return tuple(devices), tuple(failed)


def remote_devices(servers: Sequence[RpcServer], pressure_high: float,
                   probe: Callable[[RpcServer], ServerMemory] | None = None) -> tuple[RemoteDevice, ...]:
    """Each server's devices with their budgets (:func:`usable_devices`); a server that does not
    answer is an error (one line, naming it)."""
    devices, failed = usable_devices(servers, pressure_high, probe)
    if failed:
        raise one_error(failed)
    return devices


# each server's answer, by endpoint: asked once a process (an error is not kept: asked again next time)
MEASURED: MeasuredOnce[ServerMemory] = MeasuredOnce("each RPC server's devices and memory")


def _probe_once(server: RpcServer) -> ServerMemory:
    return MEASURED.get(server.endpoint, lambda: probe(server))


def remote_devices_now(servers: Sequence[RpcServer], pressure_high: float) -> tuple[RemoteDevice, ...]:
    """:func:`remote_devices`, each server asked once a process: after this process has loaded a
    model there, a server's free memory no longer counts it (the manager does), and the server,
    which serves one client at a time, is this process's until it exits."""
    probe_timeout_s()  # a bad ORION_RPC_PROBE_TIMEOUT is one line before any thread starts
    return remote_devices(servers, pressure_high, _probe_once)


def known_devices(server: RpcServer, pressure_high: float) -> tuple[RemoteDevice, ...] | None:
    """A server's devices with their budgets as this process last asked it, or None if it never
    did: never asks (a server serves one client at a time; a dashboard must not take it)."""
    memory = MEASURED.known(server.endpoint)
    return None if memory is None else tuple(server_devices(server, memory, pressure_high))


def usable_devices_now(servers: Sequence[RpcServer], pressure_high: float
                       ) -> tuple[tuple[RemoteDevice, ...], tuple[RpcError, ...]]:
    """:func:`usable_devices`, each server that answers asked once a process."""
    probe_timeout_s()
    return usable_devices(servers, pressure_high, _probe_once)


def _say_on_stderr(line: str) -> None:
    import sys

    sys.stderr.write(f"warning: {line}\n")
    sys.stderr.flush()


# Where the line about a server left out goes: the CLI's stderr; under orion serve its ServerState
# sets it to its event log (an event in /api/orion/ps and /api/orion/events, and the same line on its console).
warn: Callable[[str], None] = _say_on_stderr


# ---------------------------------------------------------------- orion rpc-server

# What llama.cpp's RPC server prints (ggml-rpc.cpp, ggml_backend_rpc_start_server) that orion reports.
_ACCEPTED, _CLOSED = "Accepted client connection", "Client connection closed"


def start_server(host: str, port: int, threads: int, *, debug: bool = False):
    """llama.cpp's RPC server for this machine's GPUs (its CPU where it has none), in a child process
    that dies with this one. Its output (stdout and stderr together) is a pipe the caller reads."""
    import subprocess

    from ._proc import ErrorChannel, die_with_parent
    from .engine.children import rpc_server_command

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
