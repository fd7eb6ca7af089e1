"""Models in runner processes: a native fault, a kill or a frozen runner costs that model's requests,
never the server. Real `orion serve` processes, real models (gemma3-270m, MiniLM), real signals sent
to the runner processes; every wait has a deadline."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import Server, _home

CHAT = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
        "max_tokens": 400, "temperature": 0.8, "seed": 1}


@pytest.fixture
def served(tmp_path_factory, gemma_q4, engine_check_cache):
    """``served(env=None, *args)``: an `orion serve` over a home with gemma3-270m and minilm imported;
    stopped (exit 0) after the test, and none of its runners left."""
    started = []

    def start(*args: str, env: dict | None = None) -> Server:
        home = _home(tmp_path_factory, gemma_q4, f"runners-{len(started)}")
        shutil.copy(engine_check_cache, home / "engine-check.json")
        s = Server(home, *args, env={"ORION_CTX": "2048"} | (env or {}))
        started.append(s)
        return s

    yield start
    for s in started:
        pids = runner_pids(s) if s.proc.poll() is None else []
        code = s.stop()
        print("".join(s.lines))
        assert code == 0
        for pid in pids:  # no orphan: every runner ended with the server
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"runner {pid} outlived the server"


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def runner_pids(s: Server) -> list[int]:
    return [m["runner_pid"] for m in s.json("GET", "/api/orion/ps")["models"] if m.get("runner_pid")]


def runner_of(s: Server, name: str) -> int:
    for m in s.json("GET", "/api/orion/ps")["models"]:
        if m["name"] == name:
            assert m["runner_pid"] and m["runner_pid"] != s.proc.pid
            return m["runner_pid"]
    raise AssertionError(f"{name} is not loaded")


class Stream:
    """A streamed chat read line by line on its own connection (the test sees each event as it comes)."""

    def __init__(self, s: Server, body: dict) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", s.info["port"], timeout=120)
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True}),
                          {"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.events: list[dict] = []
        self.first = threading.Event()
        self.done = threading.Event()

    def read(self) -> None:
        try:
            for raw in self.response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                doc = json.loads(line[6:])
                self.events.append(doc)
                if doc.get("choices") and doc["choices"][0].get("delta", {}).get("content"):
                    self.first.set()
        finally:
            self.first.set()
            self.done.set()
            self.conn.close()

    @property
    def error(self) -> dict | None:
        return next((e["error"] for e in self.events if "error" in e), None)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # polling a condition another process makes true, with a deadline
    raise AssertionError(f"not within {timeout} s: {what}")


def gone_events(s: Server) -> list[dict]:
    return [e for e in s.json("GET", "/api/orion/ps")["events"] if e["kind"] == "gone"]


def test_sigkill_of_a_runner_mid_stream_costs_its_requests_only(served):
    """The acceptance: 4 streamed chats and 3 embedding clients; the chat model's runner is killed
    with SIGKILL mid-answer. The embedding clients all finish, each stream ends in an error event,
    /api/orion/ps shows the event, the next request loads the model again, no runner outlives the server."""
    s = served("--parallel", "4")
    assert s.json("POST", "/api/orion/load", {"model": "gemma3-270m"})["loaded"]
    assert s.request("POST", "/v1/embeddings", {"model": "minilm", "input": "warm"})[0] == 200
    chat_pid, encoder_pid = runner_of(s, "gemma3-270m"), runner_of(s, "minilm")
    assert chat_pid != encoder_pid

    streams = [Stream(s, CHAT | {"seed": i}) for i in range(4)]
    readers = [threading.Thread(target=st.read, daemon=True) for st in streams]
    for t in readers:
        t.start()
    stop_embedding = threading.Event()

    def embed_client(i: int) -> list[int]:
        statuses = []
        while not stop_embedding.is_set() or len(statuses) < 3:
            status, _, _ = s.request("POST", "/v1/embeddings", {"model": "minilm", "input": [f"client {i} text {n}"
                                                                                            for n in range(8)]})
            statuses.append(status)
        return statuses

    with ThreadPoolExecutor(3) as pool:
        embedders = [pool.submit(embed_client, i) for i in range(3)]
        for st in streams:
            assert st.first.wait(120), "a stream never started"
        os.kill(chat_pid, signal.SIGKILL)
        for st in streams:
            assert st.done.wait(60), "a stream did not end after its runner was killed"
        stop_embedding.set()
        results = [f.result(timeout=120) for f in embedders]
    for statuses in results:
        assert statuses and set(statuses) == {200}, statuses
    for st in streams:
        err = st.error
        assert err is not None, st.events[-3:]
        assert err["status"] >= 500 and "runner" in err["message"] and "SIGKILL" in err["message"], err
    events = wait_until(lambda: gone_events(s), 10, "a 'gone' event in /api/orion/ps")
    assert "gemma3-270m" in events[-1]["detail"] and "SIGKILL" in events[-1]["detail"]
    assert runner_of(s, "minilm") == encoder_pid  # the encoder's runner never noticed
    status, _, payload = s.request("POST", "/v1/chat/completions", CHAT | {"max_tokens": 4})
    assert status == 200, payload
    assert runner_of(s, "gemma3-270m") not in (chat_pid, s.proc.pid)
    assert not any("internal error" in line or "Traceback" in line for line in s.lines), "".join(s.lines)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT])
def test_a_native_crash_in_a_runner_is_a_json_error_and_the_server_stays(served, sig):
    """A crash in llama.cpp (SIGSEGV, an abort) ends the runner: a non-streamed request on it gets a
    JSON 5xx naming the crash, other models keep serving, the model loads again on the next request."""
    s = served()
    assert s.request("POST", "/v1/embeddings", {"model": "minilm", "input": "warm"})[0] == 200
    assert s.json("POST", "/api/orion/load", {"model": "gemma3-270m"})["loaded"]
    pid = runner_of(s, "gemma3-270m")
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(
        s.request("POST", "/v1/chat/completions", CHAT | {"max_tokens": 1500})), daemon=True)
    worker.start()
    wait_until(lambda: any(m["in_use"] for m in s.json("GET", "/api/orion/ps")["models"] if m["name"] == "gemma3-270m"),
               60, "the request is on the model")
    os.kill(pid, sig)
    worker.join(60)
    status, _, payload = answers[0]
    err = json.loads(payload)["error"]
    assert status == 500 and err["code"] == "engine_crash", (status, err)
    assert sig.name in err["message"], err
    assert s.request("POST", "/v1/embeddings", {"model": "minilm", "input": "still here"})[0] == 200
    assert s.request("POST", "/v1/chat/completions", CHAT | {"max_tokens": 2})[0] == 200
    assert not any("Traceback" in line for line in s.lines), "".join(s.lines)


def test_a_frozen_runner_is_ended_by_its_watchdog(served):
    """A runner that stops answering (SIGSTOP) is ended after ORION_RUNNER_TIMEOUT: its request gets
    an error within the deadline, the server and the other model serve on."""
    s = served(env={"ORION_RUNNER_TIMEOUT": "2"})
    assert s.request("POST", "/v1/embeddings", {"model": "minilm", "input": "warm"})[0] == 200
    assert s.json("POST", "/api/orion/load", {"model": "gemma3-270m"})["loaded"]
    pid = runner_of(s, "gemma3-270m")
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    status, _, payload = s.request("POST", "/v1/chat/completions", CHAT | {"max_tokens": 8})
    took = time.monotonic() - start
    err = json.loads(payload)["error"]
    assert status == 500 and "stopped answering" in err["message"], (status, err)
    assert took < 2 + 10, took
    assert s.request("POST", "/v1/embeddings", {"model": "minilm", "input": "still here"})[0] == 200
    assert gone_events(s) and "stopped answering" in gone_events(s)[-1]["detail"]
    assert s.request("POST", "/v1/chat/completions", CHAT | {"max_tokens": 2})[0] == 200


def test_models_load_side_by_side_and_the_runner_memory_is_reported(served):
    """No server-wide load lock: two models load at once; each runner's resident memory is its
    model's measured_bytes in /api/orion/ps."""
    s = served()
    with ThreadPoolExecutor(2) as pool:
        loads = list(pool.map(lambda name: s.request("POST", "/api/orion/load", {"model": name})[0],
                              ["gemma3-270m", "minilm"]))
    assert loads == [200, 200]
    models = {m["name"]: m for m in s.json("GET", "/api/orion/ps")["models"]}
    for name in ("gemma3-270m", "minilm"):
        m = models[name]
        assert m["runner_pid"] and m["measured_bytes"] > 20 * 2**20 and m["rss_bytes"] > 20 * 2**20, m
    assert models["gemma3-270m"]["runner_pid"] != models["minilm"]["runner_pid"]


def test_a_runner_outlives_the_thread_that_started_it(gemma_q4, engine_verdict):
    """Linux sends PR_SET_PDEATHSIG when the forking *thread* ends: a runner started from a server's
    worker thread (which ends when idle) was killed with SIGKILL minutes later. Runners are started
    from one thread that lives as long as the process."""
    from orion_cli import engine

    spec = engine.LoadSpec(gemma_q4, 512, 2, settings=engine.settings_for(engine_verdict))
    started: list = []
    worker = threading.Thread(target=lambda: started.append(engine.start_runner(spec, check=engine_verdict)))
    worker.start()
    worker.join(120)
    model = started[0]
    try:
        assert not worker.is_alive()
        assert model.tokenize("hello") and model.alive  # the thread is gone, the runner is not
        assert model.pid != os.getpid() and os.path.exists(f"/proc/{model.pid}")
    finally:
        model.close()
    assert not model.alive


def test_the_runner_base_the_manager_counts_is_what_a_runner_takes_before_its_model():
    """Each model's estimate under `orion serve` includes RUNNER_BASE_BYTES: the interpreter,
    llama_cpp and numpy of its runner. Measured again here: within 30 %."""
    import subprocess
    import sys

    from orion_cli.engine import RUNNER_BASE_BYTES

    code = ("import orion_cli.engine.runner, orion_cli.engine.loader, llama_cpp, numpy\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.7 * RUNNER_BASE_BYTES <= kib * 1024 <= 1.3 * RUNNER_BASE_BYTES, kib


def test_made_up_names_leave_nothing_behind_in_the_server_state():
    """Every distinct unknown name is one 404 and no memory: no resolution lock, no name kept."""
    from orion_cli.errors import NotFound
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    state = ServerState(load_strategy())
    try:
        for i in range(300):
            with pytest.raises(NotFound):
                state.llm(f"made-up-{i}")
        assert state._resolving == {} and state._names == {}
    finally:
        state.close()
