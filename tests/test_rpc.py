"""A model split across machines over llama.cpp's RPC backend: `orion rpc-server`, `run/inspect/fetch --rpc`.

Everything runs on 127.0.0.1: the tests start their `orion rpc-server` processes and stop them.
Budgets are set with host:port=SIZE and ORION_MEMORY_BUDGET so that no machine alone holds the model.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error

from orion_cli._net import is_loopback
from orion_cli.estimate import EngineSettings, estimate_memory
from orion_cli.gguf_header import read_local_header
from orion_cli.offload import layers_per_gpu, plan_split
from orion_cli.rpc_endpoints import RpcServer, format_rpc_servers, parse_rpc_servers

MiB = 1024**2
PROMPT = "The capital of France is"
# What makes gemma3-270m (Q4_K_M, n_ctx 512) fit no single machine here: this machine 260 MB
# (it needs 313 MiB alone), one server 150 MB, the other 700 MB (all the layers need ~770 MiB).
LOCAL_BUDGET = "260MB"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`orion rpc-server --port P --json` in a process of its own (its llama.cpp child dies with it)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "rpc-server", "--port", str(self.port),
                                      "--threads", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        line = self.proc.stdout.readline()  # blocks until the server answers a probe (or exits)
        assert line, self.proc.stderr.read()
        self.ready = json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def servers():
    pair = [Server(), Server()]
    yield pair
    for s in pair:
        s.stop()


# ---------------------------------------------------------------- parsing and planning (no engine)


def test_rpc_server_lists_parse_and_round_trip():
    servers = parse_rpc_servers("127.0.0.1:50052, box.lan:6000=6GB")
    assert servers == (RpcServer("127.0.0.1", 50052), RpcServer("box.lan", 6000, 6 * 1024**3))
    assert parse_rpc_servers(format_rpc_servers(servers)) == servers
    assert parse_rpc_servers(["[::1]:7000"]) == (RpcServer("::1", 7000),)
    assert parse_rpc_servers("") == ()
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")  # rpc-server warns for these
    for bad in ("box", "box:", ":50052", "box:0", "box:70000", "box:port", "a:1,,b:2", "a:1=lots", "a:1,a:1"):
        with pytest.raises(ValueError):
            parse_rpc_servers(bad)


def test_orion_rpc_and_the_strategy_file_set_the_servers(orion, orion_home):
    done = orion("strategy", "--json", env={"ORION_RPC": "127.0.0.1:50052=1GB"})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["settings"]["rpc_servers"] == [f"127.0.0.1:50052={1024**3}"]
    assert doc["sources"]["rpc_servers"] == "env ORION_RPC"
    bad = orion("strategy", env={"ORION_RPC": "nowhere"})
    assert_clean_error(bad, "ORION_RPC='nowhere' is not valid", code=3)


def _gemma_header(gemma_q4):
    return read_local_header(gemma_q4)


def test_the_split_is_the_cut_llama_cpp_makes(gemma_q4):
    """orion passes each device's layer count as tensor_split: llama.cpp's own assignment rule
    (layers_per_gpu reproduces it) must then put exactly those layers on each device."""
    header = _gemma_header(gemma_q4)
    settings = EngineSettings(repack=False)
    for budgets in ([150 * MiB, 700 * MiB], [400 * MiB, 400 * MiB, 400 * MiB], [90 * MiB, 90 * MiB, 900 * MiB]):
        names = [f"RPC 127.0.0.1:{i}" for i in range(len(budgets))]
        for local in (200 * MiB, 260 * MiB, 300 * MiB):
            plan = plan_split(header, 512, settings, local, budgets, names, [0] * len(budgets),
                              endpoints=[n.split()[1] for n in names])
            if not plan.n_gpu_layers:
                continue
            cut = layers_per_gpu(header.n_layers, plan.n_gpu_layers, plan.tensor_split)
            assert cut == [g.layers if g.n_layers else (1, 0) for g in plan.gpus]
            assert sum(g.n_layers for g in plan.gpus) == plan.n_gpu_layers


def test_auto_sends_away_the_fewest_layers_and_refuses_with_the_arithmetic(gemma_q4):
    header = _gemma_header(gemma_q4)
    settings = EngineSettings(repack=False)
    names, ends = ["RPC a:1", "RPC b:2"], ["a:1", "b:2"]
    whole = estimate_memory(header, 512, settings).total_bytes
    plan = plan_split(header, 512, settings, 260 * MiB, [150 * MiB, 700 * MiB], names, [0, 0], endpoints=ends)
    assert whole > 260 * MiB  # this machine alone: no
    assert plan.local_fits and plan.gpu_fits and 0 < plan.n_gpu_layers < plan.n_total
    fewer = plan_split(header, 512, settings, 260 * MiB, [150 * MiB, 700 * MiB], names, [0, 0],
                       requested=plan.n_gpu_layers - 1, endpoints=ends)
    assert not fewer.local_fits  # one layer fewer away does not fit here
    assert "here" in plan.describe() and "a:1" in plan.describe() and "b:2" in plan.describe()
    assert plan.remote_parts == tuple((e, g.total_bytes, b) for e, g, b in zip(ends, plan.gpus, plan.gpu_budgets))

    small = plan_split(header, 512, settings, 200 * MiB, [100 * MiB, 100 * MiB], names, [0, 0], endpoints=ends)
    assert not (small.local_fits and small.gpu_fits)
    why = small.refusal()
    assert "this machine" in why and "RPC a:1" in why and "RPC b:2" in why and "budget 200 MiB" in why


def test_a_cpu_server_reports_all_its_ram_free_and_the_budget_says_so():
    from orion_cli.rpc import ServerMemory, remote_devices

    served = {"a": ServerMemory(RpcServer("a", 1), (7, 0, 0), ((8 * 1024 * MiB, 8 * 1024 * MiB),)),
              "b": ServerMemory(RpcServer("b", 2, 3000 * MiB), (7, 0, 0), ((4 * 1024 * MiB, 8 * 1024 * MiB),) * 2)}
    devices = remote_devices([RpcServer("a", 1), RpcServer("b", 2, 3000 * MiB)], 0.85,
                             probe=lambda s: served[s.host])
    assert [d.budget_bytes for d in devices] == [int(8 * 1024 * MiB * 0.85), 1500 * MiB, 1500 * MiB]
    assert "all free" in devices[0].budget_how and "given / 2 devices" in devices[1].budget_how


def test_the_manager_counts_each_servers_memory():
    from orion_cli.manager import ModelDoesNotFit, ModelManager, Request

    class Model:
        def close(self):
            pass

    manager = ModelManager(max_models=4, budget_bytes=10**9, keep_alive_s=None)
    a = Request("a", "a", 100, lambda cancel: Model(), remote=(("s:1", 600, 1000),))
    b = Request("b", "b", 100, lambda cancel: Model(), remote=(("s:1", 600, 1000),))
    c = Request("c", "c", 100, lambda cancel: Model(), remote=(("t:2", 600, 1000),))
    with manager.use(a):
        with manager.use(c):  # another server: both stay
            assert {s.name for s in manager.status()} == {"a", "c"}
        with pytest.raises(ModelDoesNotFit, match="600 B of 1000 B in use on RPC server s:1"):
            with manager.use(b):
                pass
    with manager.use(b):  # a is idle now: evicted to make room on s:1
        assert {s.name for s in manager.status()} == {"b", "c"}
        assert [s.remote_bytes for s in manager.status() if s.name == "b"] == [600]


# ---------------------------------------------------------------- the protocol, against real servers


def test_the_engine_is_built_with_rpc_and_speaks_the_protocol_orion_probes(servers):
    """The make targets build llama.cpp with -DGGML_RPC=ON; the probe's protocol is the engine's."""
    from orion_cli import engine
    from orion_cli.rpc import RPC_PROTO_MAJOR, probe

    assert engine.rpc_supported()
    for s in servers:
        assert s.ready["event"] == "ready" and s.ready["endpoint"] == s.endpoint
        assert s.ready["protocol"].split(".")[0] == str(RPC_PROTO_MAJOR)
        memory = probe(RpcServer("127.0.0.1", s.port))
        assert memory.version[0] == RPC_PROTO_MAJOR and memory.devices and memory.devices[0][1] > 0


def test_split_over_two_servers_answers_like_the_local_run(orion, gemma_q4, servers, engine_verdict):
    from orion_cli import engine
    from orion_cli.placement import rpc_settings

    spec = engine.LoadSpec(gemma_q4, 512, 2, settings=rpc_settings(engine.settings_for(engine_verdict)))
    model = engine.load(spec, check=engine_verdict)
    try:
        local = "".join(model.generate(PROMPT, max_tokens=32, temperature=0.0, top_p=0.95))
    finally:
        model.close()
    a, b = servers
    rpc = f"{a.endpoint}=150MB,{b.endpoint}=700MB"
    done = orion("run", str(gemma_q4), PROMPT, "--temperature", "0", "--max-tokens", "32", "--ctx", "512", "--json",
                 "--rpc", rpc, env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == local and local.strip()
    split = [line for line in done.stderr.splitlines() if line.startswith("split:")]
    assert len(split) == 1 and a.endpoint in split[0] and b.endpoint in split[0] and "here" in split[0]

    # the plan it printed: inspect --rpc shows it with each part's arithmetic, and that no machine alone fits
    shown = orion("inspect", str(gemma_q4), "--ctx", "512", "--json", "--rpc", rpc,
                  env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET})
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["fits"] and doc["split"]["devices"] == [f"RPC {a.endpoint}", f"RPC {b.endpoint}"]
    assert [(d["endpoint"], d["budget_bytes"]) for d in doc["servers"]] == [(a.endpoint, 150 * MiB),
                                                                         (b.endpoint, 700 * MiB)]
    alone = orion("inspect", str(gemma_q4), "--ctx", "512", "--json", env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET})
    assert not json.loads(alone.stdout)["fits"]

    # where the model fits here, nothing is sent away and it loads with this machine's own settings
    here = orion("run", str(gemma_q4), PROMPT, "--max-tokens", "4", "--ctx", "512", "--rpc", rpc, timeout=300)
    assert here.returncode == 0, here.stderr
    assert "split: none, it fits this machine" in here.stderr


def test_a_split_that_does_not_fit_is_refused_before_any_load(orion, gemma_q4, servers, monkeypatch):
    a, b = servers
    rpc = f"{a.endpoint}=100MB,{b.endpoint}=100MB"
    done = orion("run", str(gemma_q4), PROMPT, "--ctx", "512", "--rpc", rpc, env={"ORION_MEMORY_BUDGET": "200MB"})
    assert_clean_error(done, "does not fit these machines together", f"RPC {a.endpoint}", "budget", code=5)

    from orion_cli import engine, loading
    from orion_cli.errors import DoesNotFit
    from orion_cli.models import LocalModel
    from orion_cli.strategy import load_strategy

    monkeypatch.setattr(engine, "load", lambda *a, **k: pytest.fail("a refused plan must not load"))
    monkeypatch.setenv("ORION_MEMORY_BUDGET", "200MB")
    strategy = load_strategy({"n_ctx": 512, "rpc_servers": rpc})
    model = LocalModel(name="gemma", kind="llm", path=str(gemma_q4), source="path", file_type="Q4_K_M",
                       size_bytes=gemma_q4.stat().st_size)
    with pytest.raises(DoesNotFit, match="this machine .* RPC"):
        loading.model_request(model, strategy)


def test_a_server_killed_mid_run_ends_the_run_cleanly(gemma_q4, servers):
    a, b = servers
    env = dict(os.environ, NO_COLOR="1", ORION_MEMORY_BUDGET=LOCAL_BUDGET)
    run = subprocess.Popen([sys.executable, "-m", "orion_cli", "run", str(gemma_q4), "Count from 1 to 500: 1, 2, 3,",
                            "--temperature", "0", "--max-tokens", "2000", "--ctx", "2048",
                            "--rpc", f"{a.endpoint}=150MB,{b.endpoint}=1GB"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([run.stdout], [], [], 300)  # the first generated piece
        assert ready and os.read(run.stdout.fileno(), 64), run.stderr.read()
        b.kill()  # kill -9 of `orion rpc-server`: its llama.cpp child dies with it
        out, err = run.communicate(timeout=120)  # no hang
    finally:
        if run.poll() is None:
            run.kill()
    err = err.decode()
    assert run.returncode == 6, err
    assert "Traceback" not in err and f"the RPC server {b.endpoint} stopped answering mid-run" in err
    assert a.proc.poll() is None  # the other server is still up


def test_an_unreachable_or_busy_server_is_one_line_not_an_abort_or_a_hang(orion, gemma_q4, servers):
    port = _free_port()
    done = orion("run", str(gemma_q4), PROMPT, "--ctx", "512", "--rpc", f"127.0.0.1:{port}",
                 env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET})  # it needs that server
    assert_clean_error(done, f"cannot reach RPC server 127.0.0.1:{port}", "does not fit without it",
                       "orion rpc-server", code=6)

    a, _ = servers
    with socket.create_connection(("127.0.0.1", a.port)) as busy:  # another client holds the server
        busy.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        assert len(busy.recv(64)) > 0
        started = time.monotonic()
        done = orion("inspect", str(gemma_q4), "--rpc", a.endpoint)
        assert time.monotonic() - started < 60
    assert_clean_error(done, "did not answer within", "one client at a time", code=6)


def test_a_model_that_fits_here_loads_here_when_a_server_is_unreachable(orion, gemma_q4):
    port = _free_port()
    done = orion("run", str(gemma_q4), PROMPT, "--ctx", "512", "--max-tokens", "4", "--temperature", "0",
                 "--rpc", f"127.0.0.1:{port}", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and f"cannot reach RPC server 127.0.0.1:{port}" in warned[0], done.stderr
    assert "on this machine alone" in warned[0] and "Traceback" not in done.stderr


def test_a_model_that_fits_without_the_unreachable_server_uses_the_others(orion, gemma_q4, servers, monkeypatch,
                                                                           engine_verdict):
    a, _ = servers
    port = _free_port()
    rpc = f"{a.endpoint}=1GB,127.0.0.1:{port}"
    done = orion("inspect", str(gemma_q4), "--ctx", "512", "--rpc", rpc, env={"ORION_MEMORY_BUDGET": LOCAL_BUDGET})
    assert_clean_error(done, f"cannot reach RPC server 127.0.0.1:{port}", code=6)  # inspect: every server, or no plan

    import orion_cli.rpc
    from orion_cli.placement import offload_plan
    from orion_cli.strategy import load_strategy

    lines: list[str] = []
    monkeypatch.setattr(orion_cli.rpc, "warn", lines.append)
    monkeypatch.setenv("ORION_MEMORY_BUDGET", LOCAL_BUDGET)
    orion_cli.rpc.MEASURED.forget()
    try:
        strategy = load_strategy({"n_ctx": 512, "rpc_servers": rpc})
        plan, _ = offload_plan(read_local_header(gemma_q4), 512, strategy, engine_verdict)
    finally:
        orion_cli.rpc.MEASURED.forget()
    assert plan.local_fits and plan.gpu_fits and plan.n_gpu_layers
    assert {e for e in plan.endpoints if e} == {a.endpoint}
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and f"on this machine and {a.endpoint}" in lines[0]


class Serve:
    """`orion serve --port 0 --rpc ...` in its own process; stopped by the test."""

    def __init__(self, rpc: str, env: dict | None = None) -> None:
        import threading

        full = dict(os.environ, NO_COLOR="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0", "--rpc", rpc],
                                     env=full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        while True:  # its first lines say where it listens (or why it could not start)
            line = self.proc.stderr.readline()
            assert line, f"orion serve exited: {''.join(self.lines)}"
            self.lines.append(line)
            if line.startswith("orion serve on "):
                break
        self.port = int(line.split("http://127.0.0.1:", 1)[1].split()[0].rstrip(";)/"))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def chat(self, model: str) -> tuple[int, dict]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        doc = json.loads(response.read())
        conn.close()
        return response.status, doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def test_serve_with_an_unreachable_server_loads_what_fits_here_and_refuses_the_rest(orion, gemma_q4):
    imported = orion("import", str(gemma_q4), "--name", "gemma3-270m")
    assert imported.returncode == 0, imported.stderr
    port = _free_port()  # bound, then closed: nothing listens there
    serve = Serve(f"127.0.0.1:{port}")
    try:
        started = time.monotonic()
        status, doc = serve.chat("gemma3-270m")
        assert status == 200, doc
        assert doc["choices"][0]["message"]["content"] is not None
        assert time.monotonic() - started < 120
    finally:
        serve.stop()
    warned = [line for line in serve.lines if line.startswith("warning:")]
    assert len(warned) == 1 and f"cannot reach RPC server 127.0.0.1:{port}" in warned[0], serve.lines

    serve = Serve(f"127.0.0.1:{port}", env={"ORION_MEMORY_BUDGET": "200MB"})  # it needs that server
    try:
        status, doc = serve.chat("gemma3-270m")
    finally:
        serve.stop()
    assert status == 507, doc
    error = doc["error"]
    assert error["code"] == "model_does_not_fit" and error["type"] == "insufficient_memory"
    assert f"cannot reach RPC server 127.0.0.1:{port}" in error["message"] and "does not fit without it" in \
        error["message"] and "(200 MiB less 41.0 MiB for its runner process)" in error["message"]
    assert "orion rpc-server" in error["hint"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_server_frozen_mid_run_ends_the_run_with_one_line(gemma_q4, servers):
    """SIGSTOP of a server's llama.cpp: its connection stays open and silent (as a machine that hangs,
    or a cable pulled); llama.cpp's client would wait on it for ever."""
    a, b = servers
    (child,) = _children(b.proc.pid)  # `orion rpc-server`'s llama.cpp
    timeout = 10
    env = dict(os.environ, NO_COLOR="1", ORION_MEMORY_BUDGET=LOCAL_BUDGET, ORION_RPC_TIMEOUT=str(timeout))
    run = subprocess.Popen([sys.executable, "-m", "orion_cli", "run", str(gemma_q4), "Count from 1 to 500: 1, 2, 3,",
                            "--temperature", "0", "--max-tokens", "500", "--ctx", "1024",
                            "--rpc", f"{a.endpoint}=150MB,{b.endpoint}=1GB"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([run.stdout], [], [], 300)  # the first generated piece
        assert ready and os.read(run.stdout.fileno(), 64), run.stderr.read()
        os.kill(child, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = run.communicate(timeout=timeout * 10 + 60)  # no hang
        took = time.monotonic() - stopped
    finally:
        if run.poll() is None:
            run.kill()
        os.kill(child, signal.SIGCONT)
    err = err.decode()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("split:")]
    assert run.returncode == 6, err
    assert len(lines) == 1 and lines[0].startswith(f"error: RPC server {b.endpoint} stopped answering"), err
    assert "Traceback" not in err and "ORION_RPC_TIMEOUT" in lines[0]
    assert took < timeout + 20, took  # the limit (a token's steps are far shorter here), and a margin
    assert a.proc.poll() is None and b.proc.poll() is None  # both servers still up


def test_rpc_server_refuses_a_taken_port_and_a_bad_one(orion, servers):
    a, _ = servers
    done = orion("rpc-server", "--port", str(a.port))
    assert_clean_error(done, f"cannot listen on 127.0.0.1:{a.port}", code=1)
    assert_clean_error(orion("rpc-server", "--port", "70000"), "--port 70000 is not a TCP port", code=2)


def test_fetch_auto_counts_the_servers_memory(orion, hub, servers):
    from conftest import LADDER_REPO

    a, b = servers
    env = {"ORION_MEMORY_BUDGET": LOCAL_BUDGET, "ORION_CTX": "512"}
    alone = orion("fetch", LADDER_REPO, "--dry-run", "--json", env=env)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["plan"]["chosen"] is None
    together = orion("fetch", LADDER_REPO, "--dry-run", "--json", "--rpc", f"{a.endpoint}=600MB,{b.endpoint}=1GB",
                     env=env)
    assert together.returncode == 0, together.stderr
    plan = json.loads(together.stdout)["plan"]
    chosen = next(c for c in plan["candidates"] if c["verdict"] == "chosen")
    assert chosen["offload"]["fits"] and chosen["offload"]["devices"][0] == f"RPC {a.endpoint}"
    assert chosen["estimate_bytes"] <= 260 * MiB
