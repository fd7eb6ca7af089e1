"""Finding `orion serve` (orion_cli/server/discovery.py): one server per ORION_HOME, decided by a
lock the kernel lets go of; a discovery file trusted only when it is a small regular file of this
user's; a server taken for this home's only when its /health says so. Real `orion serve` processes,
started and stopped here; every wait has a deadline."""

from __future__ import annotations

import http.server
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error

START_S = 120  # a server's first line, on a loaded 2-core machine


def _env(home: Path, **more: str) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {
        "ORION_HOME": str(home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"} | more


def _serve(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0", *args], env=_env(home),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _until_started_or_gone(procs: list[subprocess.Popen], timeout: float = START_S) -> dict:
    """What each server printed on stderr until it said where it listens, or exited."""
    seen = {p: b"" for p in procs}
    pending = set(procs)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        assert left > 0, {p.pid: seen[p] for p in procs}
        ready, _, _ = select.select([p.stderr for p in pending], [], [], left)
        for p in list(pending):
            if p.stderr in ready:
                chunk = os.read(p.stderr.fileno(), 65536)
                seen[p] += chunk
                if not chunk or b"orion serve on " in seen[p]:
                    pending.discard(p)
    return {p: text.decode(errors="replace") for p, text in seen.items()}


def _serving(home: Path, timeout: float = START_S) -> dict:
    """Poll /health until the server named in ``home`` answers (it prints where it listens a moment
    before its signal handlers are in place: a SIGTERM in between would kill it outright)."""
    from orion_cli.server.discovery import NoAnswer, ServerInfo, health_doc

    deadline = time.monotonic() + timeout
    while True:
        info = json.loads((home / "server.json").read_text())
        try:
            return health_doc(ServerInfo("127.0.0.1", info["port"]))
        except NoAnswer:
            assert time.monotonic() < deadline, "the server never answered /health"
            time.sleep(0.02)  # the poll's interval (the deadline above bounds it)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout=60)
    proc.stderr.close()
    return code


def _bounded(fn, timeout: float = 20):
    """``fn()`` in a thread, which must end within ``timeout`` (a FIFO read used to hang forever)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------- one server per home


def test_two_servers_started_together_one_runs_and_the_other_names_it(tmp_path):
    for attempt in range(5):
        home = tmp_path / f"home{attempt}"
        pair = [_serve(home), _serve(home)]  # both at once: the lock decides, not who writes first
        try:
            said = _until_started_or_gone(pair)
            running = [p for p in pair if "orion serve on " in said[p]]
            assert len(running) == 1, [said[p] for p in pair]
            (winner,), (loser,) = running, [p for p in pair if p is not running[0]]
            assert loser.wait(timeout=60) == 1
            lines = [line for line in said[loser].splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: orion serve is already running"), lines
            assert f"pid {winner.pid}" in lines[0] and "Traceback" not in said[loser]
            info = json.loads((home / "server.json").read_text())
            assert info["pid"] == winner.pid
            assert _serving(home)["pid"] == winner.pid
            assert _stop(winner) == 0
            assert not (home / "server.json").exists()
        finally:
            for p in pair:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=60)


def test_a_server_killed_with_sigkill_leaves_nothing_that_blocks_the_next(tmp_path):
    home = tmp_path / "home"
    first = _serve(home)
    assert "orion serve on " in _until_started_or_gone([first])[first]
    assert _stop(first, signal.SIGKILL) == -signal.SIGKILL
    assert (home / "server.json").exists() and (home / "server.lock").exists()  # what it left: both stale
    second = _serve(home)
    try:
        said = _until_started_or_gone([second])[second]
        assert "orion serve on " in said and "error" not in said, said
        assert json.loads((home / "server.json").read_text())["pid"] == second.pid
        assert int((home / "server.lock").read_text()) == second.pid
        assert _serving(home)["pid"] == second.pid
        assert _stop(second) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=60)
    assert not (home / "server.json").exists()


def test_health_names_the_service_and_its_home(tmp_path):
    from orion_cli.server.discovery import ServerInfo, health_doc, live_server

    home = tmp_path / "home"
    home.mkdir()
    linked = tmp_path / "linked-home"
    linked.symlink_to(home)  # the same home by another name: resolved on both sides
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=_env(linked),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert "orion serve on " in _until_started_or_gone([proc])[proc]
        info = json.loads((home / "server.json").read_text())
        doc = health_doc(ServerInfo("127.0.0.1", info["port"]))
        assert doc["status"] == "ok" and doc["service"] == "orion" and doc["pid"] == proc.pid
        assert doc["home"] == str(home.resolve()) and "version" in doc and "uptime_s" in doc
        assert live_server(_env(home)) == ServerInfo("127.0.0.1", info["port"], proc.pid, info["started_at"])
        assert live_server(_env(linked)) is not None
        other = tmp_path / "other-home"  # the same server.json copied into another home: not that home's server
        other.mkdir()
        (other / "server.json").write_text((home / "server.json").read_text())
        os.chmod(other / "server.json", 0o600)
        said: list[str] = []
        assert live_server(_env(other), notice=said.append) is None
        assert len(said) == 1 and "serves another ORION_HOME" in said[0], said
        assert not (other / "server.json").exists()  # stale there: removed
        assert _stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


# ---------------------------------------------------------------- a port that is not orion's


class _NotOrion(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def not_orion():
    """Another program on 127.0.0.1 that answers 200 {"status": "ok"} on /health (and everything)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotOrion)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _write_server_json(home: Path, doc) -> Path:
    path = home / "server.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.chmod(path, 0o600)
    return path


def test_a_stale_file_whose_port_another_program_answers_is_not_taken_for_orion(orion_home, not_orion, orion,
                                                                                gemma_q4):
    from orion_cli.server.discovery import live_server

    stale = {"host": "127.0.0.1", "port": not_orion, "pid": os.getpid()}  # a live pid, as after pid reuse
    _write_server_json(orion_home, stale)
    said: list[str] = []
    assert live_server(notice=said.append) is None
    assert len(said) == 1 and "is not orion serve" in said[0]
    assert not (orion_home / "server.json").exists()  # stale: removed

    assert orion("import", str(gemma_q4), "--name", "gemma3-270m").returncode == 0
    _write_server_json(orion_home, stale)
    done = orion("run", "gemma3-270m", "1, 2, 3,", "--max-tokens", "3", "--temperature", "0", "--json",
                 env={"ORION_CTX": "512"}, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["text"] and "served_by" not in doc  # answered in this process
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) <= 1 and "error" not in done.stderr and "Traceback" not in done.stderr, done.stderr

    assert not (orion_home / "server.json").exists()
    _write_server_json(orion_home, stale)
    assert_clean_error(orion("ps"), "no orion serve is running", code=4)  # and orion ps says there is none
    assert live_server({"ORION_HOST": f"127.0.0.1:{not_orion}", "ORION_HOME": str(orion_home)},
                       notice=said.append) is None  # ORION_HOST naming it: not orion either
    assert "is not orion serve" in said[-1]


def test_the_health_document_must_match_service_home_and_pid(orion_home):
    from orion_cli.server.discovery import resolved_home

    home = resolved_home()
    path = _write_server_json(orion_home, {"host": "127.0.0.1", "port": 9, "pid": os.getpid()})

    def found(doc):
        _write_server_json(orion_home, {"host": "127.0.0.1", "port": 9, "pid": os.getpid()})
        from orion_cli.server.discovery import live_server

        said: list[str] = []
        return live_server(health=lambda info: doc, notice=said.append), said

    ok = {"status": "ok", "service": "orion", "home": home, "pid": os.getpid()}
    assert found(ok)[0] is not None and path.exists()
    for doc, why in [({"status": "ok"}, "not orion serve"), (None, "not orion serve"), ([1, 2], "not orion serve"),
                     (ok | {"service": "ollama"}, "not orion serve"), (ok | {"home": "/elsewhere"}, "another ORION_HOME"),
                     (ok | {"pid": os.getpid() + 1}, f"not pid {os.getpid()}")]:
        info, said = found(doc)
        assert info is None and len(said) == 1 and why in said[0], (doc, said)


def test_a_dead_pid_is_stale_and_removed_quietly(orion_home):
    from orion_cli.server.discovery import live_server

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_server_json(orion_home, {"host": "127.0.0.1", "port": 9, "pid": dead.pid})
    said: list[str] = []
    assert live_server(notice=said.append) is None and said == []
    assert not (orion_home / "server.json").exists()


def test_a_file_replaced_meanwhile_is_not_removed(orion_home):
    """A client that read a stale file removes that file only: a server starting meanwhile wrote a
    new one (a new inode), which stays."""
    from orion_cli.server.discovery import _remove_if_same, check_server_file

    _write_server_json(orion_home, {"host": "127.0.0.1", "port": 9, "pid": 1})
    check = check_server_file()
    tmp = orion_home / "new.json"
    tmp.write_text(json.dumps({"host": "127.0.0.1", "port": 10, "pid": 2}))
    os.replace(tmp, orion_home / "server.json")
    _remove_if_same(orion_home / "server.json", check.ident)
    assert json.loads((orion_home / "server.json").read_text())["port"] == 10


# ---------------------------------------------------------------- files that are not a discovery file


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _big(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b'{"host": "127.0.0.1", "port": 9, "pid": 1, "pad": "' + b"x" * (10 << 20) + b'"}')
    os.chmod(path, 0o600)


def _folder(path: Path) -> None:
    path.mkdir()


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{not json at all\x00")
    os.chmod(path, 0o600)


def _wrong_shape(path: Path) -> None:
    path.write_text(json.dumps({"host": ["127.0.0.1"], "port": "11435", "pid": True}))
    os.chmod(path, 0o600)


def _a_list(path: Path) -> None:
    path.write_text("[1, 2, 3]")
    os.chmod(path, 0o600)


def _world_writable(path: Path) -> None:
    path.write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": os.getpid()}))
    os.chmod(path, 0o666)


def _another_users(path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("making a file another user's needs root")
    path.write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": os.getpid()}))
    os.chmod(path, 0o600)
    os.chown(path, 65534, 65534)


# (make it, what the client's notice says, whether orion serve replaces it: a regular file of this
# user's is a stale one; anything else is refused, never replaced)
ODD_FILES = {
    "fifo": (_fifo, "a FIFO", False),
    "dev-zero-link": (_dev_zero, "a symbolic link", False),
    "10MB": (_big, "more than a discovery file ever holds", True),
    "folder": (_folder, "a folder", False),
    "garbage": (_garbage, "not orion's discovery file", True),
    "wrong-shape": (_wrong_shape, "not orion's discovery file", True),
    "a-list": (_a_list, "not orion's discovery file", True),
    "world-writable": (_world_writable, "writable by other users", True),
    "another-user": (_another_users, "owned by uid 65534", False),
}


@pytest.mark.parametrize("kind", list(ODD_FILES))
def test_an_odd_discovery_file_is_ignored_by_clients(kind, orion_home, orion):
    from orion_cli.server.discovery import live_server, read_server_file

    make, why, _ = ODD_FILES[kind]
    make(orion_home / "server.json")
    said: list[str] = []
    assert _bounded(lambda: live_server(notice=said.append)) is None
    assert _bounded(read_server_file) is None
    assert len(said) == 1 and why in said[0], said
    started = time.monotonic()
    assert_clean_error(orion("ps", timeout=60), "no orion serve is running", code=4)
    assert time.monotonic() - started < 60
    assert os.path.lexists(orion_home / "server.json")  # a client removes only a file it read as stale


@pytest.mark.parametrize("kind", list(ODD_FILES))
def test_orion_serve_replaces_a_stale_regular_file_and_refuses_anything_else(kind, orion_home):
    make, _, replaced = ODD_FILES[kind]
    path = orion_home / "server.json"
    make(path)
    proc = _serve(orion_home)
    try:
        said = _until_started_or_gone([proc])[proc]
        if replaced:
            assert "orion serve on " in said, said
            assert json.loads(path.read_text())["pid"] == proc.pid
            assert _serving(orion_home)["pid"] == proc.pid
            assert _stop(proc) == 0
            assert not path.exists()
        else:
            assert proc.wait(timeout=60) == 1
            lines = [line for line in said.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"error: {path} is "), said
            assert "not orion's discovery file" in lines[0] and "Traceback" not in said
            assert os.path.lexists(path)  # left as it was
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


@pytest.mark.parametrize("make", [_fifo, _dev_zero, _folder])
def test_an_odd_lock_file_is_refused_in_one_line(make, orion_home):
    make(orion_home / "server.lock")
    proc = _serve(orion_home)
    try:
        said = _until_started_or_gone([proc])[proc]
        assert proc.wait(timeout=60) == 1
        lines = [line for line in said.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {orion_home / 'server.lock'} is "), said
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_the_server_timeout_variable_is_checked(orion):
    from orion_cli.errors import ConfigError
    from orion_cli.server.discovery import health_timeout, server_timeout

    assert server_timeout({}) == 30 and health_timeout({}) == 5
    assert server_timeout({"ORION_SERVER_TIMEOUT": "2.5"}) == 2.5 and health_timeout({"ORION_SERVER_TIMEOUT": "2"}) == 2
    for bad in ("soon", "0", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="ORION_SERVER_TIMEOUT"):
            server_timeout({"ORION_SERVER_TIMEOUT": bad})
