"""A fake llama.cpp RPC server for tests: a TCP server on 127.0.0.1 (port 0) in threads of the test's
own process, speaking as much of ggml's RPC protocol as orion's probe asks (hello, device count,
each device's memory), and misbehaving on purpose.

    from fake_rpc_peer import FakeRpcPeer

    with FakeRpcPeer("stall_after_probe", free_bytes=2 * 2**30) as peer:
        peer.endpoint            # "127.0.0.1:PORT", for --rpc / ORION_RPC
        ...                      # run orion against it
        peer.wait_stalled(60)    # True once a client sent a command it will never answer
        peer.received            # every request seen: Received(connection, command, size, payload)
    # leaving the block stops it: listener and connections closed, threads joined

Behaviours (``FakeRpcPeer.BEHAVIOURS``):

- ``normal``: answers like a CPU server with ``free_bytes`` free (of ``total_bytes``, default the
  same: ggml's CPU device reports all its RAM as free), ``devices`` devices; any other command
  closes the connection (as a real server does with a request it cannot parse).
- ``stall_after_probe``: answers the probe completely, then goes silent on the first command that is
  not part of a probe (llama.cpp's own connection asks for more than the probe does): it keeps
  reading and recording, and never answers. ``probes=N`` answers the probe commands on the first N
  connections only: every later connection (llama.cpp's own, after orion's probe) gets no answer at
  all, not even to its hello. Default: every connection's probe commands are answered, so a process
  that probes again (a runner process) still gets to llama.cpp's stall.
- ``many_devices``: claims 2**31-1 devices.
- ``trickle``: sends each answer one byte every ``trickle_s`` seconds (3).
- ``close_after_hello``: answers the hello, then closes the connection.
- ``garbage``: answers the first request with ``garbage`` (an SSH banner), not a framed answer.

Requests are | command: 1 byte | size: 8 bytes LE | payload |; answers are | size: 8 bytes LE | data |.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from typing import Self

HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY = 14, 15, 11
PROBE_COMMANDS = frozenset({HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY})
CONN_CAPS = 24  # the hello's transport capabilities (none)
RECORD_BYTES = 4096  # of each request's payload, what is kept (the rest is read and dropped)
MANY = 2**31 - 1


def _proto_major() -> int:
    from orion_cli.rpc import RPC_PROTO_MAJOR

    return RPC_PROTO_MAJOR


@dataclass(frozen=True)
class Received:
    """One request the peer read: on which connection (0, 1, ... in accept order), its command
    byte, the size its header gave, and the first RECORD_BYTES of its payload."""

    connection: int
    command: int
    size: int
    payload: bytes


class _Gone(Exception):
    """The client closed the connection (or the peer is stopping)."""


class FakeRpcPeer:
    BEHAVIOURS = ("normal", "stall_after_probe", "many_devices", "trickle", "close_after_hello", "garbage")

    def __init__(self, behaviour: str = "normal", *, free_bytes: int = 8 * 2**30, total_bytes: int | None = None,
                 devices: int = 1, version: tuple[int, int, int] | None = None, trickle_s: float = 3.0,
                 probes: int | None = None, garbage: bytes = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n") -> None:
        if behaviour not in self.BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r}: one of {', '.join(self.BEHAVIOURS)}")
        self.behaviour = behaviour
        self.free_bytes = free_bytes
        self.total_bytes = free_bytes if total_bytes is None else total_bytes
        self.devices = devices
        self.version = version or (_proto_major(), 0, 0)
        self.trickle_s = trickle_s
        self.probes = probes
        self.garbage = garbage
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0  # accepted so far
        self.stalled = threading.Event()  # a request was read that will never be answered
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ life

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def commands(self, connection: int | None = None) -> list[int]:
        """The command bytes received (on one connection, or all), in order."""
        return [r.command for r in self.received if connection is None or r.connection == connection]

    def wait_stalled(self, timeout: float) -> bool:
        return self.stalled.wait(timeout)

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(16)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "fake-rpc-accept")
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and wait for the peer's threads (bounded)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux)
            except OSError:
                pass
            try:  # and a connection, wherever shutdown does not
                socket.create_connection((self.host, self.port), timeout=1).close()
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes recv() and sendall()
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=10)
            assert not t.is_alive(), f"the fake RPC peer's thread {t.name} did not stop"
        for conn in conns:
            conn.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeRpcPeer({self.behaviour!r}, {self.endpoint})"

    # ------------------------------------------------------------ serving

    def _spawn(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            with self._lock:
                index = self.connections
                self.connections += 1
                self._conns.append(conn)
            self._spawn(self._serve, f"fake-rpc-conn-{index}", conn, index)

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = conn.recv(min(n - len(data), 1 << 16))
            if not chunk or self._stop.is_set():
                raise _Gone()
            data += chunk
        return bytes(data)

    def _read_request(self, conn: socket.socket, index: int) -> Received:
        cmd, size = struct.unpack("<BQ", self._recv_exact(conn, 9))
        kept = self._recv_exact(conn, min(size, RECORD_BYTES))
        left = size - len(kept)
        while left:  # the rest is read and dropped: a huge size costs no memory
            left -= len(self._recv_exact(conn, min(left, 1 << 16)))
        request = Received(index, cmd, size, kept)
        with self._lock:
            self._received.append(request)
        return request

    def _send(self, conn: socket.socket, data: bytes) -> None:
        if self.behaviour != "trickle":
            conn.sendall(data)
            return
        for i in range(len(data)):
            if i and self._stop.wait(self.trickle_s):  # the behaviour's own pace; stop ends it
                raise _Gone()
            conn.sendall(data[i:i + 1])

    @staticmethod
    def _framed(data: bytes) -> bytes:
        return struct.pack("<Q", len(data)) + data

    def _answer(self, request: Received) -> bytes | None:
        """The answer to a probe command (None: the command is not one)."""
        if request.command == HELLO:
            return self._framed(bytes(self.version) + b"\0" + bytes(CONN_CAPS))
        if request.command == DEVICE_COUNT:
            return self._framed(struct.pack("<I", MANY if self.behaviour == "many_devices" else self.devices))
        if request.command == GET_DEVICE_MEMORY:
            return self._framed(struct.pack("<QQ", self.free_bytes, self.total_bytes))
        return None

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            silent = self.behaviour == "stall_after_probe" and self.probes is not None and index >= self.probes
            said = False  # (garbage) the banner was sent
            while True:
                request = self._read_request(conn, index)
                if silent or (self.behaviour == "stall_after_probe" and request.command not in PROBE_COMMANDS):
                    silent = True
                    self.stalled.set()
                    continue  # read on, answer nothing, until the client (or stop) closes
                if self.behaviour == "garbage":
                    if not said:
                        conn.sendall(self.garbage)  # then nothing more: the client gives up on it
                    said = True
                    continue
                answer = self._answer(request)
                if answer is None:  # not a command this peer knows: a real server closes the connection
                    return
                self._send(conn, answer)
                if self.behaviour == "close_after_hello" and request.command == HELLO:
                    return
        except (_Gone, OSError):
            return
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
