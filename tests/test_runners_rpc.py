"""RPC servers that stop answering, seen through `orion serve`: the model split onto them loads and
runs in a runner process, which its server ends when the RPC server stays silent past
ORION_RPC_TIMEOUT; the request gets a clean error, the server keeps serving and stops on SIGTERM.
A fake peer (tests/fake_rpc_peer.py) that answers orion's probe and then goes silent, and a real
`orion rpc-server` whose llama.cpp child is stopped with SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from fake_rpc_peer import FakeRpcPeer
from test_rpc import servers  # noqa: F401 - the fixture
from test_runners import CHAT, Stream, gone_events, served, wait_until  # noqa: F401 - the fixture

RPC_TIMEOUT = 3
# gemma3-270m at n_ctx 512 needs 313 MiB here, and a runner 41 MiB of its own: with this budget it
# must send layers away, and this machine's part (at least 220 MiB) still fits what is left
LOCAL_BUDGET = "320MB"


def test_a_peer_that_stalls_after_the_probe_costs_one_load_not_the_server(served):  # noqa: F811
    """The issue's freeze: a peer answers the probe, then never answers llama.cpp. The split model's
    request fails within ORION_RPC_TIMEOUT + a margin with a JSON error naming the server; meanwhile
    the server answers /health, /api/orion/ps and /metrics at once, and an embedding request is answered
    (once the stalled load is given up, its room is free); SIGTERM then stops the server (the fixture
    checks exit 0)."""
    with FakeRpcPeer("stall_after_probe", free_bytes=2 * 2**30) as peer:
        s = served("--rpc", f"{peer.endpoint}=2GB",
                   env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET, "ORION_CTX": "512", "ORION_RPC_TIMEOUT": str(RPC_TIMEOUT)})
        answers: list = []
        started = time.monotonic()
        chat = threading.Thread(target=lambda: answers.append(
            s.request("POST", "/v1/chat/completions", CHAT | {"max_tokens": 8})), daemon=True)
        chat.start()
        assert peer.wait_stalled(60), peer.received  # llama.cpp (in the runner) now waits on the peer
        for path in ("/health", "/api/orion/ps", "/metrics"):
            t = time.monotonic()
            assert s.request("GET", path)[0] == 200
            assert time.monotonic() - t < 2, path
        embedded = s.request("POST", "/v1/embeddings", {"model": "minilm", "input": "independent"})
        assert embedded[0] == 200, embedded
        chat.join(RPC_TIMEOUT + 60)
        took = time.monotonic() - started
        status, _, payload = answers[0]
        err = json.loads(payload)["error"]
        assert status >= 500 and peer.endpoint in err["message"] and "no answer" in err["message"], (status, err)
        assert took < RPC_TIMEOUT + 60, took
        events = [e for e in s.json("GET", "/api/orion/ps")["events"] if e["kind"] == "failed"]
        assert events and peer.endpoint in events[-1]["detail"]
        assert not any("Traceback" in line for line in s.lines), "".join(s.lines)


def test_sigterm_during_a_stalled_load_stops_the_server_within_its_grace(served):  # noqa: F811
    with FakeRpcPeer("stall_after_probe", free_bytes=2 * 2**30) as peer:
        s = served("--rpc", f"{peer.endpoint}=2GB",
                   env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET, "ORION_CTX": "512", "ORION_RPC_TIMEOUT": "600"})
        threading.Thread(target=lambda: s.request("POST", "/v1/chat/completions", CHAT), daemon=True).start()
        assert peer.wait_stalled(60)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 25


def _llama_child(pid: int) -> int:
    """The llama.cpp child of an `orion rpc-server` process."""
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    assert children, "the rpc-server has no child"
    return int(children[0])


def test_a_real_rpc_server_frozen_mid_answer_ends_that_runner_with_an_error_event(served, servers):  # noqa: F811
    """`orion rpc-server` whose llama.cpp child is stopped (SIGSTOP) mid-generation: the split model's
    runner is ended after ORION_RPC_TIMEOUT, its stream ends in an error event naming the server, and
    the server serves on."""
    a, b = servers
    s = served("--rpc", f"{a.endpoint}=150MB,{b.endpoint}=1GB",
               env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET, "ORION_CTX": "512", "ORION_RPC_TIMEOUT": str(RPC_TIMEOUT)})
    child = _llama_child(b.proc.pid)
    stream = Stream(s, CHAT | {"max_tokens": 400})
    reader = threading.Thread(target=stream.read, daemon=True)
    reader.start()
    try:
        assert stream.first.wait(300), "the split model never answered"
        os.kill(child, signal.SIGSTOP)
        assert stream.done.wait(RPC_TIMEOUT + 60), "the stream hung on a frozen RPC server"
    finally:
        os.kill(child, signal.SIGCONT)
    err = stream.error
    assert err is not None and "no answer" in err["message"] and b.endpoint in err["message"], stream.events[-3:]
    events = wait_until(lambda: gone_events(s), 10, "a gone event")
    assert "no answer" in events[-1]["detail"]
    assert s.request("GET", "/health")[0] == 200
    assert not any("Traceback" in line for line in s.lines), "".join(s.lines)
