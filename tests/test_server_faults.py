"""Faults of `orion serve` seen from outside, each with a real server started and stopped here:
concurrent requests on one sequence (``--parallel 1``: llama.cpp used to be entered from several
threads at once, SIGSEGV), a broken GGUF run through a server (exit 7, as in-process), a client that
hangs up while its model loads (the model is not left in use)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import assert_clean_error
from test_serve import Server, cli


@pytest.fixture
def serve(tmp_path, engine_check_cache):
    """``serve(*args, env=None)``: `orion serve` in a fresh ORION_HOME (this machine's engine verdict
    copied in); stopped, and its exit checked, after the test."""
    started = []

    def start(*args: str, env: dict | None = None) -> Server:
        home = tmp_path / f"home-{len(started)}"
        home.mkdir()
        shutil.copy(engine_check_cache, home / "engine-check.json")
        server = Server(home, "--allow-paths", *args, env=env)  # these tests name their models by path
        started.append(server)
        return server

    yield start
    for server in started:
        code = server.stop()
        print("".join(server.lines))  # the server's console, shown when a test failed
        assert code == 0


def test_parallel_1_answers_concurrent_completions(serve, gemma_q4):
    """--parallel 1: four completions at once share one sequence of the model's one decoder (they
    take turns there); every one is answered and the server stays up."""
    s = serve("--parallel", "1", "--max-queue", "8", env={"ORION_CTX": "512"})
    prompts = ["One, two, three,", "Monday, Tuesday, Wednesday,", "The capital of France is", "A, B, C,"]

    def ask(prompt: str):
        status, _, payload = s.request("POST", "/v1/completions", {"model": str(gemma_q4), "prompt": prompt,
                                                                   "max_tokens": 8, "temperature": 0})
        return status, json.loads(payload)

    for _ in range(2):  # the first round loads the model under the concurrent requests
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, prompts))
        assert [status for status, _ in answers] == [200] * 4, answers
        assert all(doc["choices"][0]["text"] and doc["usage"]["completion_tokens"] >= 1 for _, doc in answers)
    assert s.proc.poll() is None and s.request("GET", "/health")[0] == 200
    alone = ask(prompts[1])[1]["choices"][0]["text"]
    assert alone == answers[1][1]["choices"][0]["text"]  # one sequence: each as it would be alone
    assert not any("internal error" in line for line in s.lines), "".join(s.lines)


def test_a_broken_gguf_through_the_server_exits_7_as_in_process(serve, tmp_path):
    """A file that is not a GGUF is exit 7 in-process; through a server it was a 422 read back as a
    usage error (exit 2)."""
    broken = tmp_path / "random.gguf"
    broken.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0))  # a header claiming 2^62 tensors
    s = serve()
    here = cli(s, "run", str(broken), "hi", "--local")
    assert_clean_error(here, code=7)
    there = cli(s, "run", str(broken), "hi")
    assert_clean_error(there, code=7)
    assert there.stderr == here.stderr  # the same line, whoever found it
    metrics = s.request("GET", "/metrics")[2].decode()
    assert 'route="/v1/chat/completions"' in metrics and 'status="422"' in metrics  # it went through the server
    missing = cli(s, "run", str(tmp_path / "none.gguf"), "hi")
    assert_clean_error(missing, code=4)


def test_a_client_that_hangs_up_while_its_model_loads_leaves_it_free(serve, gemma_q4):
    """A streamed request, and the client gone (reset) once the server began loading its model: the
    model loads, then is not in use, its queue place back."""
    s = serve(env={"ORION_CTX": "512"})
    body = json.dumps({"model": str(gemma_q4), "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 4, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", s.info["port"]), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 120
    while not any(e["kind"] == "loading" for e in s.json("GET", "/api/orion/ps")["events"]):
        assert time.monotonic() < deadline, "the server never began loading"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset: the client is gone while the model loads
    while True:
        models = s.json("GET", "/api/orion/ps")["models"]
        if models and not models[0]["in_use"] and models[0]["queue_depth"] == 0:
            break
        assert time.monotonic() < deadline, f"the model is still held: {models}"
    done = s.request("POST", "/v1/chat/completions", {"model": str(gemma_q4), "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
    assert done[0] == 200
    assert not any("internal error" in line for line in s.lines), "".join(s.lines)
