"""`orion serve` against clients that hold connections (issue 20, item 11): idle connections, half-sent
headers and bodies are closed at their deadlines (408 when part of a request came) while a good
request answers at once; requests past the connection limit get 503; a non-streamed generation
stops when its client leaves. Real `orion serve` processes, real sockets, the real Gemma 3 270M."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_serve import Server

MODEL = "gemma3-270m"


class Serve(Server):
    """`orion serve --port 0` in its own process (tests/test_serve.py's Server), its console kept
    (shown when a test fails); :meth:`request` answers (status, body)."""

    def __init__(self, home: Path, env: dict | None = None, *args: str) -> None:
        super().__init__(home, *args, env=env)
        self.port = self.info["port"]

    def request(self, method: str, path: str, body=None, timeout: float = 120) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None) -> dict:
        status, payload = self.request(method, path, body)
        assert status == 200, (status, payload)
        return json.loads(payload)

    def model(self) -> dict | None:
        return next((m for m in self.json("GET", "/api/orion/ps")["models"] if m["name"] == MODEL), None)

    def decode_steps(self) -> int:
        text = self.request("GET", "/metrics")[1].decode()
        name = f'orion_decode_steps_total{{model="{MODEL}"}}'
        line = next((x for x in text.splitlines() if x.startswith(name)), None)
        return int(line.split()[-1]) if line else 0

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def console(self) -> str:
        """What it printed (all of it once it has exited)."""
        if self.proc.poll() is not None:
            self.drain.join(10)
        return "".join(self.lines)


def prepared_home(home: Path, gemma_q4: Path, engine_check_cache: Path) -> Path:
    """``home`` as an ORION_HOME with Gemma imported as gemma3-270m (and this machine's engine verdict)."""
    shutil.copy(engine_check_cache, home / "engine-check.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"ORION_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "orion_cli", "import", str(gemma_q4), "--name", MODEL], env=env,
                   check=True, capture_output=True, timeout=120)
    return home


class Servers:
    """Servers started in copies of a prepared home; :meth:`stop_all` checks each exits 0."""

    def __init__(self, template: Path, tmp_path: Path) -> None:
        self.template, self.tmp_path, self.started = template, tmp_path, []

    def start(self, env: dict | None = None, *args: str) -> Serve:
        home = self.tmp_path / f"home{len(self.started)}"
        shutil.copytree(self.template, home)
        self.started.append(Serve(home, env, *args))
        return self.started[-1]

    def stop_all(self) -> None:
        for s in self.started:
            code = s.stop()
            print(s.console())
            assert code == 0


@pytest.fixture(scope="module")
def home_template(tmp_path_factory, gemma_q4, engine_check_cache) -> Path:
    return prepared_home(tmp_path_factory.mktemp("serve-limits-home"), gemma_q4, engine_check_cache)


@pytest.fixture
def start(home_template, tmp_path):
    """start(env) -> a running Serve; stopped (exit 0) after the test."""
    servers = Servers(home_template, tmp_path)
    yield servers.start
    servers.stop_all()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setblocking(False)
    return sock


def closed_by_server(socks: list[socket.socket], since: float, deadline_s: float) -> dict:
    """Wait until the server closes each socket (EOF or reset); returns {socket: (when it closed, in
    seconds from ``since``, a monotonic time; what it sent before)}. Fails if one is open
    ``deadline_s`` after ``since``."""
    start = since
    got = {sock: b"" for sock in socks}
    ended: dict[socket.socket, tuple[float, bytes]] = {}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        while len(ended) < len(socks):
            left = start + deadline_s - time.monotonic()
            assert left > 0, f"{len(socks) - len(ended)} of {len(socks)} connections still open after {deadline_s} s"
            for key, _ in sel.select(left):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                except BlockingIOError:
                    continue
                if data:
                    got[sock] += data
                    continue
                ended[sock] = (time.monotonic() - start, got[sock])
                sel.unregister(sock)
    return ended


def chat_body(max_tokens: int, prompt: str = "Count from one to ten.") -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}


# ---------------------------------------------------------------- deadlines


def test_idle_and_half_sent_connections_are_closed_at_their_deadlines(start):
    s = start({"ORION_HTTP_HEADER_TIMEOUT": "3", "ORION_HTTP_BODY_TIMEOUT": "4", "ORION_HTTP_IDLE_TIMEOUT": "3"})
    assert s.request("POST", "/v1/chat/completions", chat_body(1))[0] == 200  # the model loaded before the clock starts
    opened = time.monotonic()
    idle = [connect(s.port) for _ in range(200)]
    bodies = [connect(s.port) for _ in range(100)]
    heads = [connect(s.port) for _ in range(20)]
    for sock in bodies:  # headers and 10 bytes of a 1,000-byte body
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
    for sock in heads:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        # while they are open, good requests answer at once (before the first deadline)
        assert s.request("GET", "/health")[0] == 200
        status, payload = s.request("POST", "/v1/chat/completions", chat_body(1))
        assert status == 200, payload
        answered = time.monotonic() - opened
        ended = closed_by_server(idle + bodies + heads, opened, 30)
    finally:
        for sock in idle + bodies + heads:
            sock.close()
    first_closed = min(at for at, _ in ended.values())
    assert answered < first_closed, (answered, first_closed)  # answered while all of them were open
    margin = 3  # the loop's timers, 320 sockets, a busy machine
    for sock in idle:  # closed without a word, as an idle kept-alive connection is
        at, data = ended[sock]
        assert data == b"" and at < 3 + margin, (at, data)
    for group, limit, what in ((bodies, 4, b"body"), (heads, 3, b"headers")):
        answers = [ended[sock][1] for sock in group]
        assert all(limit - 0.5 < ended[sock][0] < limit + margin for sock in group), \
            sorted(ended[sock][0] for sock in group)[::10]
        # a 408 in the routes' error shape (the server had read all they sent: a FIN, no reset to lose it)
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), [a for a in answers if b" 408 " not in a][:3]
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"connection: close" in head.lower()
            err = json.loads(body)["error"]
            assert err["code"] == "request_timeout" and what in err["message"].encode(), err
    # the server goes on: nothing of theirs is left in /api/orion/ps, and it answers
    assert s.model()["queue_depth"] == 0
    assert s.request("GET", "/health")[0] == 200
    assert "Traceback" not in s.console() and "Exception in ASGI" not in s.console(), s.console()


def test_a_kept_alive_connection_is_closed_after_its_idle_time_without_a_408(start):
    s = start({"ORION_HTTP_IDLE_TIMEOUT": "1", "ORION_HTTP_HEADER_TIMEOUT": "5"})
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    try:
        for _ in range(2):  # two requests on it, then it idles
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 "), data
        t = time.monotonic()
        rest = sock.recv(65536)  # blocks until the server closes it
        assert rest == b"" and time.monotonic() - t < 1 + 2.5
    finally:
        sock.close()


def test_requests_past_the_connection_limit_get_503(start):
    """...as the routes' JSON error (uvicorn's own reply was plain text), told when to try again."""
    s = start({"ORION_HTTP_MAX_CONNECTIONS": "20", "ORION_HTTP_IDLE_TIMEOUT": "30", "ORION_HTTP_HEADER_TIMEOUT": "30"})
    held = [connect(s.port) for _ in range(25)]
    try:
        deadline = time.monotonic() + 10  # the server has accepted them all: /api/orion/ps is refused
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            try:
                conn.request("GET", "/health")
                response = conn.getresponse()
                status, headers, payload = response.status, dict(response.getheaders()), response.read()
            finally:
                conn.close()
            if status == 503:
                break
            assert time.monotonic() < deadline, "the limit never applied"
    finally:
        for sock in held:
            sock.close()
    assert headers.get("content-type") == "application/json", (headers, payload)
    assert headers.get("retry-after") == "1" and headers.get("connection") == "close", headers
    err = json.loads(payload)["error"]
    assert err["code"] == "too_many_connections" and err["type"] == "server_busy", err
    assert "20 connections" in err["message"] and set(err) >= {"message", "type", "param", "code"}, err
    assert "Exceeded concurrency limit" in s.console()  # the console says so, as uvicorn did
    deadline = time.monotonic() + 10  # they are gone: it answers again
    while s.request("GET", "/health")[0] != 200:
        assert time.monotonic() < deadline


@pytest.mark.parametrize("var, value", [("ORION_HTTP_HEADER_TIMEOUT", "soon"), ("ORION_HTTP_BODY_TIMEOUT", "0"),
                                        ("ORION_HTTP_MAX_CONNECTIONS", "-3"), ("ORION_SERVE_GRACE", "1e9")])
def test_a_bad_limit_in_the_environment_is_one_error_line(orion, var, value):
    from conftest import assert_clean_error

    assert_clean_error(orion("serve", "--port", "0", env={var: value}, timeout=60), var)


def test_limits_from_the_environment_and_their_defaults():
    from orion_cli.server.http_limits import HTTPLimits, limits_from_env, parse_seconds

    assert limits_from_env(HTTPLimits(), {}) == HTTPLimits(10.0, 30.0, 5.0, 1000, 10.0)
    got = limits_from_env(HTTPLimits(), {"ORION_HTTP_HEADER_TIMEOUT": "500ms", "ORION_HTTP_BODY_TIMEOUT": "2m",
                                         "ORION_HTTP_IDLE_TIMEOUT": " 3 ", "ORION_HTTP_MAX_CONNECTIONS": "64",
                                         "ORION_SERVE_GRACE": "2.5s"})
    assert got == HTTPLimits(0.5, 120.0, 3.0, 64, 2.5)
    assert parse_seconds(".5", "x") == 0.5


# ---------------------------------------------------------------- a client that leaves


def test_a_non_streamed_generation_stops_when_its_client_leaves(start):
    # The context (2,048) holds the gone request's ~2,011 tokens (prompt and max_tokens) or the next
    # one's ~45, not both: the next one runs only once the gone one has let go of its share.
    s = start({"ORION_CTX": "2048"})
    assert s.request("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})[0] == 200
    before = s.decode_steps()
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 60
    while s.decode_steps() <= before + 5:  # it generates (the runner's count comes with its heartbeat)
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.05)  # a poll's pace, not a wait for something
    sock.close()
    gone_at = time.monotonic()
    while (m := s.model())["in_use"] or m["queue_depth"]:  # it lets go at its next token
        assert time.monotonic() - gone_at < 10, f"the gone client's generation still runs: {m}"
        time.sleep(0.05)
    status, payload = s.request("POST", "/v1/completions", {"model": MODEL, "prompt": "Once upon a time",
                                                             "max_tokens": 40, "temperature": 0})
    assert status == 200, payload
    # Had the gone one gone on, this one would have waited for its 2,000 tokens (the decoder's count
    # says it, whatever the machine's speed): it ran at once.
    steps = s.decode_steps() - before
    assert steps < 1000, steps  # the gone one's few dozen or hundred, and this one's 40
    text = s.request("GET", "/metrics")[1].decode()
    assert f'orion_requests_total{{route="/v1/completions",model="{MODEL}",status="499"}} 1' in text, text
