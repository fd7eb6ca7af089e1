"""The RPC probe against peers that misbehave (tests/fake_rpc_peer.py): one overall deadline per
server, servers probed side by side, every count and size bounded, one line naming the server;
and the watchdog that ends a run whose server stops answering.

Everything is on 127.0.0.1; the fake peers run in threads of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import assert_clean_error
from fake_rpc_peer import FakeRpcPeer

from orion_cli.rpc import MAX_DEVICES, RPC_PROTO_MAJOR, RpcError, probe, probe_all
from orion_cli.rpc_endpoints import RpcServer

GiB = 1024**3
MARGIN_S = 3.0  # a process's start (Python, imports) on a busy 2-core machine, on top of a deadline


def _server(peer: FakeRpcPeer) -> RpcServer:
    return RpcServer(peer.host, peer.port)


def _timed(fn):
    started = time.monotonic()
    try:
        result = fn()
    except RpcError as exc:
        result = exc
    return result, time.monotonic() - started


# ---------------------------------------------------------------- the fake peer itself


def test_a_normal_peer_answers_like_a_cpu_server_and_records_the_probe():
    with FakeRpcPeer("normal", free_bytes=2 * GiB, devices=2) as peer:
        memory = probe(_server(peer))
        assert memory.version[0] == RPC_PROTO_MAJOR
        assert memory.devices == ((2 * GiB, 2 * GiB),) * 2
        assert peer.commands() == [14, 15, 11, 11]  # hello, device count, each device's memory
        assert peer.connections == 1 and peer.received[0].size == 24  # the hello's capabilities
    assert not peer.stalled.is_set()


def test_a_stalling_peer_answers_the_probe_then_never_answers_llama_cpp():
    """What another test relies on: orion's probe goes through; the next command that is not part
    of a probe (llama.cpp's own, on its connection) is read and never answered."""
    import socket
    import struct

    with FakeRpcPeer("stall_after_probe", free_bytes=2 * GiB) as peer:
        assert peer.endpoint == f"127.0.0.1:{peer.port}"
        assert probe(_server(peer)).devices == ((2 * GiB, 2 * GiB),)
        assert probe(_server(peer)).devices  # a second process's probe too (a runner)
        with socket.create_connection((peer.host, peer.port), timeout=5) as s:
            s.sendall(struct.pack("<BQ", 14, 24) + bytes(24))  # hello: answered
            assert len(s.recv(64)) > 0
            s.sendall(struct.pack("<BQI", 1, 4, 0))  # get_alignment: read, never answered
            assert peer.wait_stalled(10)
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(1)
        assert peer.commands(2) == [14, 1]
    with FakeRpcPeer("stall_after_probe", probes=1) as peer:  # the brief's letter: the 2nd connection is mute
        probe(_server(peer))
        result, _ = _timed(lambda: probe(_server(peer), timeout=0.5))
        assert isinstance(result, RpcError) and "did not answer within 0.5 s" in result.message


# ---------------------------------------------------------------- the probe: one deadline, bounded


@pytest.mark.parametrize("behaviour, fragment", [
    ("many_devices", (f"says it serves 2147483647 devices (at most {MAX_DEVICES} make sense): not an RPC server "
                      "orion understands")),
    ("trickle", "did not finish answering within 2 s"),
    ("close_after_hello", "closed the connection"),
    ("garbage", "does not answer as llama.cpp's RPC server does"),
])
def test_each_misbehaving_peer_is_one_error_within_the_deadline(behaviour, fragment):
    with FakeRpcPeer(behaviour) as peer:
        result, took = _timed(lambda: probe(_server(peer), timeout=2.0))
    assert isinstance(result, RpcError), result
    assert peer.endpoint in result.message and fragment in result.message, result.message
    assert "\n" not in result.one_line()
    assert took < 2.0 + 1.0


def test_servers_are_probed_side_by_side_one_deadline_for_all():
    peers = [FakeRpcPeer("trickle").start() for _ in range(3)] + [FakeRpcPeer("normal").start()]
    try:
        started = time.monotonic()
        results = probe_all([_server(p) for p in peers], timeout=1.5)
        took = time.monotonic() - started
    finally:
        for p in peers:
            p.stop()
    assert took < 1.5 + 1.0  # one after another: 4.5 s at least
    assert [type(r).__name__ for r in results] == ["RpcError"] * 3 + ["ServerMemory"]
    assert all(p.endpoint in r.message for p, r in zip(peers, results[:3]))


def test_a_peer_that_trickles_bytes_cannot_hold_inspect_past_the_deadline(orion, gemma_q4):
    """It used to: 5 s a read, one byte every 3 s, 40 s and more."""
    with FakeRpcPeer("trickle") as peer:
        started = time.monotonic()
        done = orion("inspect", str(gemma_q4), "--rpc", peer.endpoint, timeout=60)
        took = time.monotonic() - started
    assert_clean_error(done, f"RPC server {peer.endpoint} did not finish answering within 5 s", code=6)
    assert took < 5.0 + MARGIN_S


@pytest.mark.parametrize("behaviour, fragment", [
    ("many_devices", "not an RPC server orion understands"),
    ("close_after_hello", "closed the connection"),
    ("garbage", "does not answer as llama.cpp's RPC server does"),
    ("trickle", "did not finish answering within 1 s"),
])
def test_inspect_rpc_against_each_misbehaving_peer_is_one_line_exit_6(orion, gemma_q4, behaviour, fragment):
    with FakeRpcPeer(behaviour) as peer:
        started = time.monotonic()
        done = orion("inspect", str(gemma_q4), "--rpc", peer.endpoint, env={"ORION_RPC_PROBE_TIMEOUT": "1"},
                     timeout=60)
        took = time.monotonic() - started
    assert_clean_error(done, f"RPC server {peer.endpoint}", fragment, code=6)
    assert took < 1.0 + MARGIN_S


def test_several_failing_servers_cost_one_deadline_and_one_line(orion, gemma_q4):
    peers = [FakeRpcPeer("trickle").start() for _ in range(3)]
    try:
        started = time.monotonic()
        done = orion("inspect", str(gemma_q4), "--rpc", ",".join(p.endpoint for p in peers),
                     env={"ORION_RPC_PROBE_TIMEOUT": "2"}, timeout=60)
        took = time.monotonic() - started
    finally:
        for p in peers:
            p.stop()
    assert_clean_error(done, f"RPC server {peers[0].endpoint} did not finish", "(and 2 more:", peers[2].endpoint,
                       code=6)
    assert took < 2.0 + MARGIN_S  # not 3 × 2 s


def test_inspect_rpc_against_a_normal_peer_plans_the_split(orion, gemma_q4):
    with FakeRpcPeer("normal", free_bytes=2 * GiB) as peer:
        done = orion("inspect", str(gemma_q4), "--ctx", "512", "--json", "--rpc", peer.endpoint,
                     env={"ORION_MEMORY_BUDGET": "260MB"})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["fits"] and doc["split"]["devices"] == [f"RPC {peer.endpoint}"]
    assert doc["servers"][0]["free_bytes"] == 2 * GiB and doc["servers"][0]["endpoint"] == peer.endpoint
    assert peer.commands() == [14, 15, 11]


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_bad_probe_timeout_is_one_configuration_error(orion, gemma_q4, value):
    done = orion("inspect", str(gemma_q4), "--rpc", "127.0.0.1:9", env={"ORION_RPC_PROBE_TIMEOUT": value})
    assert_clean_error(done, f"ORION_RPC_PROBE_TIMEOUT={value!r} is not valid", code=3)


# ---------------------------------------------------------------- the watchdog


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_times_only_armed_work_on_servers_and_allows_slow_steps():
    from orion_cli.engine.ggml_rpc import (
        FIRST_STEP_FACTOR,
        SLOWEST_FACTOR,
        StallWatchdog,
    )

    clock, stalls = _Clock(), []
    dog = StallWatchdog(10, clock=clock, on_stall=lambda endpoints, waited: stalls.append((endpoints, waited)), tick=0)
    clock.now += 1000
    assert not dog.check()  # not armed
    with dog.armed():
        clock.now += 1000
        assert not dog.check()  # armed, but no server in use (the model fits here)
    dog.serve(["127.0.0.1:1", "127.0.0.1:1"])
    assert dog.endpoints == ("127.0.0.1:1",)
    steps = [0]
    with dog.armed():
        progress = dog.beating()
        clock.now += 9
        progress(0.5)  # the load's progress
        clock.now += 9
        assert not dog.check()
        dog.watch(lambda: steps[0])  # loaded: its decode steps count from here
        clock.now += 10 * FIRST_STEP_FACTOR - 1  # the prompt's first batch may take longer
        assert not dog.check()
        steps[0] += 1
        assert not dog.check()  # that step took 39 s: 10 × that is allowed from now on
        clock.now += SLOWEST_FACTOR * 39 - 1
        assert not dog.check()
        clock.now += 2
        assert dog.check()
    assert stalls == [(("127.0.0.1:1",), SLOWEST_FACTOR * 39 + 1)]
    dog.close()


def test_a_load_onto_a_peer_that_stops_answering_ends_with_one_line(orion, gemma_q4):
    """llama.cpp's own connection gets no answer: without the watchdog `orion run` waits for ever."""
    with FakeRpcPeer("stall_after_probe", free_bytes=2 * GiB) as peer:
        started = time.monotonic()
        done = orion("run", str(gemma_q4), "Hello", "--ctx", "512", "--max-tokens", "8", "--rpc", peer.endpoint,
                     env={"ORION_MEMORY_BUDGET": "260MB", "ORION_RPC_TIMEOUT": "3"}, timeout=120)
        took = time.monotonic() - started
        assert peer.stalled.is_set()
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("split:")]
    assert done.returncode == 6, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: RPC server {peer.endpoint} stopped answering"), done.stderr
    assert "Traceback" not in done.stderr and "ORION_RPC_TIMEOUT" in lines[0]
    assert took < 3.0 + 15  # the deadline, a load's start and the process's


def test_a_bad_rpc_timeout_is_one_configuration_error(orion, gemma_q4):
    done = orion("run", str(gemma_q4), "Hello", "--rpc", "127.0.0.1:9", env={"ORION_RPC_TIMEOUT": "never"})
    assert_clean_error(done, "ORION_RPC_TIMEOUT='never' is not valid", code=3)


def test_the_stalled_server_is_told_from_the_socket_a_thread_waits_on():
    import socket
    import threading

    from orion_cli.engine.ggml_rpc import stalled_endpoints

    with FakeRpcPeer("stall_after_probe") as stalled, FakeRpcPeer("normal") as fine:
        conn = socket.create_connection((stalled.host, stalled.port))
        other = socket.create_connection((fine.host, fine.port))
        conn.sendall(b"\x01" + (4).to_bytes(8, "little") + bytes(4))  # not a probe command: never answered
        waiting = threading.Thread(target=lambda: conn.recv(1), daemon=True)
        waiting.start()
        assert stalled.wait_stalled(10)
        deadline = time.monotonic() + 10
        while stalled_endpoints([fine.endpoint, stalled.endpoint]) != [stalled.endpoint]:
            assert time.monotonic() < deadline, "the blocked thread's socket was never found"
        conn.shutdown(socket.SHUT_RDWR)
        waiting.join(5)
        conn.close()
        other.close()
    assert stalled_endpoints(["127.0.0.1:1", "box:2"]) == ["127.0.0.1:1", "box:2"]  # none blocked: all named


def test_fake_peer_stops_cleanly_with_clients_still_connected():
    import socket

    peer = FakeRpcPeer("stall_after_probe").start()
    clients = [socket.create_connection((peer.host, peer.port)) for _ in range(3)]
    for c in clients:
        c.sendall(b"\x01" + (4).to_bytes(8, "little") + bytes(4))
    assert peer.wait_stalled(10)
    started = time.monotonic()
    peer.stop()
    assert time.monotonic() - started < 5
    for c in clients:
        c.settimeout(5)
        try:  # closed by the peer: an end of stream, or a reset where the peer closed with bytes unread
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass
        c.close()
    with pytest.raises(OSError):
        socket.create_connection((peer.host, peer.port), timeout=2).close()


def test_the_fake_peer_serves_another_process(tmp_path):
    """A child process (a runner, an `orion serve`) reaches the peer as well."""
    with FakeRpcPeer("normal", free_bytes=3 * GiB) as peer:
        code = ("import sys; from orion_cli.rpc import probe; from orion_cli.rpc_endpoints import RpcServer; "
                f"print(probe(RpcServer('127.0.0.1', {peer.port})).devices)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"(({3 * GiB}, {3 * GiB}),)"
