"""SIGTERM always ends `orion serve` within its grace period (issue 20): whatever its connections are
doing (idle, half-sent headers or body, an open /api/orion/events stream, long generations streamed or
not), `kill -TERM` ends the process within ``grace + ~1 s``, exit code 0, server.json removed, the
models unloaded; requests that finish within the grace period are answered, those still generating
after it get an error. Real `orion serve` processes (ORION_SERVE_GRACE), real Gemma 3 270M."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

from test_server_timeouts import (  # noqa: F401 - home_template and start: the fixtures
    MODEL,
    chat_body,
    closed_by_server,
    connect,
    home_template,
    start,
)

MARGIN_S = 4.0  # signal to exit: the loop's 0.1 s ticks, unloading, the interpreter's exit, a busy machine


def stopped_cleanly(s, signalled: float, within: float) -> float:
    """The server exits 0 within ``within`` s of ``signalled``, server.json removed, its model unloaded."""
    code = s.proc.wait(timeout=within + 30)
    took = time.monotonic() - signalled
    assert code == 0, s.console()
    assert took < within, (took, s.console())
    assert not (s.home / "server.json").exists()
    assert "Traceback" not in s.console() and "Exception in ASGI" not in s.console(), s.console()
    return took


def ask_in_thread(port: int, path: str, body: dict, out: dict) -> threading.Thread:
    """POST ``body`` on a thread; ``out`` gets status and payload (or the error that ended it)."""
    def go():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            out["status"] = response.status
            out["payload"] = response.read()
        except (OSError, http.client.HTTPException) as exc:
            out["error"] = exc
        finally:
            out["ended_at"] = time.monotonic()
            conn.close()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def read_until(sock: socket.socket, marker: bytes, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)  # a poll's pace
    return got


def test_sigterm_with_idle_half_sent_and_event_connections_exits_at_once(start):  # noqa: F811 - the fixture
    s = start({"ORION_SERVE_GRACE": "5", "ORION_HTTP_HEADER_TIMEOUT": "60", "ORION_HTTP_BODY_TIMEOUT": "60"})
    idle = [connect(s.port) for _ in range(20)]
    kept = socket.create_connection(("127.0.0.1", s.port), timeout=30)  # a kept-alive one, after a response
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_until(kept, b"}").startswith(b"HTTP/1.1 200 ")
    kept.setblocking(False)
    body = connect(s.port)
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    head = connect(s.port)
    head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    events = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    events.sendall(b"GET /api/orion/events HTTP/1.1\r\nHost: x\r\n\r\n")
    read_until(events, b": orion events")  # the stream is open
    events.setblocking(False)
    signalled = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        ended = closed_by_server([*idle, kept, body, head, events], signalled, MARGIN_S)
    finally:
        for sock in [*idle, kept, body, head, events]:
            sock.close()
    took = stopped_cleanly(s, signalled, MARGIN_S)  # not the 5 s grace: none of them was being answered
    for sock in (body, head):  # part of a request arrived: told why, not just cut
        answer = ended[sock][1]
        if answer:  # (a reset may lose it: the kernel drops what the client did not read)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "server_shutting_down"
    assert all(ended[sock][1] == b"" for sock in [*idle, kept])
    assert ended[events][1].rstrip().endswith(b"0")  # the event stream's last chunk: it ended, not cut
    print(f"exited {took:.2f} s after SIGTERM")


def test_sigterm_during_long_generations_answers_them_after_the_grace_period(start):  # noqa: F811 - the fixture
    grace = 12.0  # the short request finishes within it even on a loaded 2-core machine (4 s did not, once)
    s = start({"ORION_SERVE_GRACE": str(grace), "ORION_CTX": "8192"})
    assert s.request("POST", "/v1/chat/completions", chat_body(1))[0] == 200  # loaded
    whole: dict = {}
    streamed: dict = {"events": []}
    quick: dict = {}
    long_body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 4000, "temperature": 0}
    threads = [ask_in_thread(s.port, "/v1/completions", long_body, whole)]

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(long_body | {"stream": True}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            streamed["status"] = response.status
            for line in response:
                if line.startswith(b"data: "):
                    streamed["events"].append(line[6:].strip())
        except (OSError, http.client.HTTPException) as exc:
            streamed["error"] = exc
        finally:
            streamed["ended_at"] = time.monotonic()
            conn.close()

    threads.append(threading.Thread(target=stream, daemon=True))
    threads[-1].start()
    wait_until(lambda: len(streamed["events"]) > 3 and s.model()["users"] >= 2, 60, "the generations never started")
    threads.append(ask_in_thread(s.port, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3,
                                                              "temperature": 0}, quick))
    wait_until(lambda: s.model()["users"] >= 3 or "status" in quick, 30, "the short request never started")
    signalled = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    took = stopped_cleanly(s, signalled, grace + MARGIN_S)
    for thread in threads:
        thread.join(30)
    # the short one finished within the grace period: answered whole
    assert quick.get("status") == 200, quick
    # the long ones were still generating when it ended: stopped, and told so
    assert whole.get("status") == 503, whole
    err = json.loads(whole["payload"])["error"]
    assert err["code"] == "server_shutting_down", err
    assert whole["ended_at"] - signalled > grace - 0.5  # not before the grace period was over
    assert streamed.get("status") == 200 and streamed["ended_at"] - signalled > grace - 0.5, streamed
    assert isinstance(streamed.get("error"), (type(None), http.client.IncompleteRead)), streamed
    if streamed["events"][-1] != b"[DONE]":  # its model took over ABORT_S to unload: cut, without its end
        assert all(b'"error"' not in e for e in streamed["events"]), streamed["events"][-3:]
    else:  # stopped as its model was unloaded under it: an error event, then the end
        last = [json.loads(e) for e in streamed["events"] if e != b"[DONE]"][-1]
        assert "error" in last and "shutting down" in last["error"]["message"], last
        assert streamed["events"][-1] == b"[DONE]"
    assert "unloaded" in s.console()
    print(f"exited {took:.2f} s after SIGTERM (grace {grace} s)")


def test_sigterm_the_moment_the_server_announces_itself_is_a_clean_stop(tmp_path):
    """The signal handlers are installed before server.json is written and the "orion serve on" line
    printed: a SIGTERM sent as soon as that line is read (a supervisor, a test) ends the server with
    exit 0 and server.json removed, never a process killed by the signal (-15) with its file left."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"NO_COLOR": "1",
                                                                               "PYTHONUNBUFFERED": "1"}
    for attempt in range(5):
        home = tmp_path / f"home{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"],
                                env=env | {"ORION_HOME": str(home)}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = []
        try:
            for line in proc.stderr:  # until it says where it listens
                seen.append(line)
                if line.startswith("orion serve on "):
                    proc.send_signal(signal.SIGTERM)
                    break
            rest = proc.communicate(timeout=60)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        console = "".join(seen) + rest
        assert any(line.startswith("orion serve on ") for line in seen), console
        assert proc.returncode == 0, (attempt, proc.returncode, console)
        assert not (home / "server.json").exists(), (attempt, console)
        assert "Traceback" not in console, console
