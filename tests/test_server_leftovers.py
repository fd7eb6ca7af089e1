"""What a review of `orion serve` left: the server's console shows names and messages, never runs
them; /metrics keeps one series per model served, not one per name a client made up; the sampling
ranges are the CLI's own (orion_cli.limits); a request the connection answered itself (408, or 503
when the grace period is over) is counted as what its client got, not as a client that left; an RPC
server left out at load time is an event in /api/orion/ps and /api/orion/events.

The app runs over a real ServerState (models in this process, ORION_RUNNERS=0), driven at the ASGI
level (tests/test_server_inprocess.py's ``call``) or behind uvicorn with orion's own HTTP protocol in
a thread of this process, so that its counters can be read after the connection answered; `serve()`
itself runs in this process's main thread until it signals itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time

import pytest
from test_server_inprocess import call, call_json

MODEL = "gemma3-270m"
HI = [{"role": "user", "content": "hi"}]
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def states(monkeypatch):
    """``states(strategy=None, **kwargs)``: a ServerState over this test's ORION_HOME and its app;
    closed after the test (and orion_cli.rpc's warning hook, which a ServerState takes, given back)."""
    from orion_cli import rpc
    from orion_cli.server.app import create_app
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    monkeypatch.setenv("ORION_CTX", "1024")
    monkeypatch.setenv("ORION_RUNNERS", "0")
    monkeypatch.setattr(rpc, "warn", rpc.warn)
    made = []

    def make(strategy=None, **kwargs):
        state = ServerState(strategy or load_strategy({}), **kwargs)
        made.append(state)
        return state, create_app(state)

    yield make
    for state in made:
        state.close()


def wait_until(check, timeout: float, what: str):
    """``check()`` once it is true, polled until ``timeout`` (a state read, not a time slept on)."""
    deadline = time.monotonic() + timeout
    pace = threading.Event()
    while not (got := check()):
        assert time.monotonic() < deadline, what
        pace.wait(0.02)
    return got


def counted(state, route: str) -> dict:
    """{(model label, status): requests} of ``route`` in the server's counters."""
    return {(model, status): n for (r, model, status), n in dict(state.metrics.requests).items() if r == route}


# ---------------------------------------------------------------- the console


def test_console_lines_show_escape_sequences_never_run_them():
    from orion_cli.server import console

    lines: list[str] = []
    say, log = console(lines.append)
    say("loaded \x1b]0;owned\x07model\x1b[2J\u202egnp.\nforged: line")
    log("internal error on /v1/completions: Traceback\n  File \x1b[31m'x'\x9b\n")
    assert lines[0] == "loaded \ufffd]0;owned\ufffdmodel\ufffd[2J\ufffdgnp.\ufffdforged: line"  # one line
    assert lines[1] == "internal error on /v1/completions: Traceback\n  File \ufffd[31m'x'\ufffd\n"  # its lines kept


def test_every_line_serve_prints_goes_through_printable(monkeypatch):
    """`serve()` in this process: its host warning, its own lines, and an event (an RPC warning that
    quotes an endpoint's answer, as orion_cli.placement says it) reach the console without a control
    character; then SIGTERM ends it cleanly."""
    from orion_cli import rpc
    from orion_cli.server import serve
    from orion_cli.strategy import load_strategy

    monkeypatch.setattr(rpc, "warn", rpc.warn)
    lines: list[str] = []

    def act() -> None:
        rpc.warn("RPC servers left out (10.0.0.9:50052 said \x1b]0;owned\x07\x1b[2J\nforged line)")
        os.kill(os.getpid(), signal.SIGTERM)

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("orion serve on "):
            threading.Thread(target=act, daemon=True).start()

    serve(load_strategy({}), host="0.0.0.0", port=0, say=say)
    assert lines[0].startswith("warning: listening on 0.0.0.0 without an API key"), lines
    assert any(line.startswith("orion serve on ") for line in lines), lines
    warned = [line for line in lines if "left out" in line]
    assert warned == ["warning: RPC servers left out (10.0.0.9:50052 said \ufffd]0;owned\ufffd\ufffd[2J\ufffdforged "
                      "line)"], lines
    assert not [line for line in lines if CONTROLS.search(line) or "\n" in line], lines


# ---------------------------------------------------------------- /metrics labels


def test_names_that_resolve_to_nothing_add_no_metrics_series(states, gemma_q4):
    from orion_cli.models import import_gguf

    import_gguf(gemma_q4, name=MODEL)
    state, app = states()
    for i in range(300):  # a client that makes up names: each the same refusal, under one label
        route, body = [("/v1/chat/completions", {"model": f"made-up-{i}", "messages": HI}),
                       ("/v1/embeddings", {"model": f"made-up-{i}", "input": "x"}),
                       ("/api/orion/load", {"model": f"made-up-{i}"})][i % 3]
        assert call(app, "POST", route, body)[0] == 404
    assert call(app, "POST", "/api/orion/unload", {"model": "made-up-x"})[0] == 404
    # a name that resolved is its model's label, even when the request is refused after that
    status, _, payload = call(app, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 5})
    assert status == 400 and json.loads(payload)["error"]["param"] == "temperature"
    text = call(app, "GET", "/metrics")[2].decode()
    assert "made-up" not in text
    assert counted(state, "/v1/chat/completions") == {("-", 404): 100}
    assert counted(state, "/v1/embeddings") == {("-", 404): 100}
    assert counted(state, "/api/orion/load") == {("-", 404): 100}
    assert counted(state, "/api/orion/unload") == {("-", 404): 1}
    assert counted(state, "/v1/completions") == {(MODEL, 400): 1}
    assert len(state.metrics.requests) == 5 + 1  # and /metrics itself, unlabelled


def test_load_takes_embedding_as_a_json_boolean_only(states, gemma_q4):
    from orion_cli.models import import_gguf

    import_gguf(gemma_q4, name=MODEL)
    state, app = states()
    for value in ("yes", "false", 1, [True]):
        status, _, payload = call(app, "POST", "/api/orion/load", {"model": MODEL, "embedding": value})
        err = json.loads(payload)["error"]
        assert status == 400 and err["param"] == "embedding" and err["code"] == "invalid_value", payload
    assert state.manager.status() == []  # nothing was loaded as an encoder, nor as anything
    assert call_json(app, "POST", "/api/orion/load", {"model": MODEL, "embedding": False})["kind"] == "llm"


# ---------------------------------------------------------------- sampling ranges: one rule


def test_the_servers_sampling_ranges_are_the_clis(monkeypatch):
    from orion_cli import limits
    from orion_cli.errors import InvalidValue
    from orion_cli.server.http_errors import APIError
    from orion_cli.server.openai import generation_options

    n_ctx = 512
    ranges = {"temperature": limits.TEMPERATURE, "top_p": limits.TOP_P, "seed": limits.SEED,
              "max_tokens": limits.max_tokens_range(n_ctx), "presence_penalty": limits.PENALTY,
              "frequency_penalty": limits.PENALTY}
    for key, allowed in ranges.items():
        values = [allowed.low, allowed.high, allowed.low - 1, allowed.high + 1, (allowed.low + allowed.high) / 2,
                  0.5, 2.0, 10**400, float("inf"), "1", True]
        for value in values:
            try:
                allowed.check(f"--{key}", value)
                cli = True
            except InvalidValue:
                cli = False
            try:
                got = generation_options({key: value}, n_ctx)[key]
                server = True
            except APIError as exc:
                server = False
                assert exc.param == key and allowed.describe() in exc.message, exc.message
            assert server == cli, (key, value, server, cli)
            if server:
                assert got == value and type(got) is (int if allowed.integer else float), (key, value, got)
    # one rule: a range changed in orion_cli.limits is the server's at once
    monkeypatch.setattr(limits, "TEMPERATURE", limits.Range(0.0, 1.5, integer=False, example="0.7"))
    with pytest.raises(APIError, match=r"'temperature' must be a number from 0 to 1\.5, such as 0\.7, not 1\.8"):
        generation_options({"temperature": 1.8}, n_ctx)


# ---------------------------------------------------------------- answered by the connection, counted so


class Uvicorn:
    """The app over ``state`` behind uvicorn and orion's HTTP protocol (its deadlines, its answers at
    shutdown), served from a thread of this process: the state's counters are there to read."""

    def __init__(self, state, limits) -> None:
        import uvicorn

        from orion_cli.server import bind
        from orion_cli.server.app import create_app
        from orion_cli.server.http_limits import protocol_class

        self.sock = bind("127.0.0.1", 0)  # listening already: a client may connect at once
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                                http=protocol_class(limits), timeout_keep_alive=limits.idle_s)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        ready = threading.Event()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            ready.set()
            await self.server.serve(sockets=[self.sock])

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), name="uvicorn", daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def in_loop(self, fn) -> None:
        done = threading.Event()

        def go() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(go)
        assert done.wait(30)

    def give_up(self) -> None:
        """What `orion serve` does when its grace period is over: 503 to the requests still worked on."""
        from orion_cli.server.http_limits import give_up

        self.in_loop(lambda: give_up(self.server.server_state.connections, streams=False))

    def stop(self) -> None:
        self.in_loop(lambda: setattr(self.server, "should_exit", True))
        self.thread.join(60)
        self.sock.close()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_body_past_its_deadline_is_counted_408_not_499(states):
    from orion_cli.server.http_limits import HTTPLimits

    state, _ = states()
    server = Uvicorn(state, HTTPLimits(body_s=0.5, header_s=30, idle_s=30))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": \"minilm\", \"input\": ")
            reply = read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        assert wait_until(lambda: counted(state, "/v1/embeddings"), 30, "the route never ended") == {("-", 408): 1}
    finally:
        server.stop()


def test_a_generation_answered_503_at_the_end_of_the_grace_period_is_counted_503(states, gemma_q4):
    from orion_cli.models import import_gguf
    from orion_cli.server.http_limits import HTTPLimits

    import_gguf(gemma_q4, name=MODEL)
    state, app = states()
    assert call_json(app, "POST", "/api/orion/load", {"model": MODEL})["loaded"]
    server = Uvicorn(state, HTTPLimits())
    try:
        body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0})
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            wait_until(lambda: any(m["name"] == MODEL and m["users"] for m in call_json(app, "GET", "/api/orion/ps")["models"]),
                       60, "the generation never started")
            server.give_up()
            reply = read_all(sock)
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        err = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
        assert err["code"] == "server_shutting_down", err
        assert wait_until(lambda: counted(state, "/v1/completions"), 60, "the route never ended") == {(MODEL, 503): 1}
    finally:
        server.stop()


# ---------------------------------------------------------------- an RPC server left out: an event


def test_an_rpc_server_left_out_at_load_time_is_an_event(states, gemma_q4):
    """The warning orion_cli.placement gives (the model fits without the server) is, under the server,
    an event of /api/orion/events and /api/orion/ps, and the console's ``warning:`` line, as the CLI says it."""
    from orion_cli.models import import_gguf
    from orion_cli.strategy import load_strategy

    import_gguf(gemma_q4, name=MODEL)
    with socket.socket() as closed:  # bound, then closed: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    lines: list[str] = []
    state, app = states(load_strategy({"rpc_servers": f"127.0.0.1:{port}"}), on_line=lines.append)

    async def watch() -> list[dict]:
        """/api/orion/events, open while the model is loaded through /api/orion/load; its documents until a warning."""
        opened, warned, leave = asyncio.Event(), asyncio.Event(), asyncio.Event()
        docs: list[dict] = []

        async def receive():
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message) -> None:
            chunk = message.get("body", b"")
            if chunk.startswith(b": orion events"):
                opened.set()
            for line in chunk.decode().splitlines():
                if line.startswith("data: "):
                    docs.append(json.loads(line[6:]))
                    if docs[-1]["kind"] == "warning":
                        warned.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": "/api/orion/events", "raw_path": b"/api/orion/events",
                 "query_string": b"", "root_path": "", "headers": [], "server": ("127.0.0.1", 0),
                 "client": ("127.0.0.1", 1)}
        stream = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(opened.wait(), 30)
        loaded = await asyncio.to_thread(call_json, app, "POST", "/api/orion/load", {"model": MODEL})
        assert loaded["loaded"]
        await asyncio.wait_for(warned.wait(), 30)
        leave.set()
        await asyncio.wait_for(stream, 30)
        return docs

    docs = asyncio.run(watch())
    (warning,) = [d for d in docs if d["kind"] == "warning"]
    assert f"cannot reach RPC server 127.0.0.1:{port}" in warning["detail"], warning
    assert "on this machine alone" in warning["detail"], warning
    assert [d["kind"] for d in docs].index("warning") < [d["kind"] for d in docs].index("loaded"), docs
    ps = call_json(app, "GET", "/api/orion/ps")
    assert [e["detail"] for e in ps["events"] if e["kind"] == "warning"] == [warning["detail"]], ps["events"]
    assert 'orion_model_events_total{kind="warning"} 1' in call(app, "GET", "/metrics")[2].decode()
    assert [line for line in lines if line.startswith("warning: ")] == [f"warning: {warning['detail']}"], lines
