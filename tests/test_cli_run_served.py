"""`orion run`'s REPL through a running `orion serve`, and on in this process when the server is killed
(the server layer's chat policy, driven through a pseudo-terminal as a person would type)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest


@pytest.fixture
def served_home(tmp_path, gemma_q4, engine_check_cache):
    home = tmp_path / "served-home"
    home.mkdir()
    shutil.copy(engine_check_cache, home / "engine-check.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {
        "ORION_HOME": str(home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "ORION_CTX": "1024"}
    subprocess.run([sys.executable, "-m", "orion_cli", "import", str(gemma_q4), "--name", "gemma3-270m"], env=env,
                   check=True, capture_output=True)
    server = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in server.stderr:  # its first lines say where it listens
        seen.append(line)
        if line.startswith("orion serve on "):
            break
    else:
        raise AssertionError(f"orion serve exited: {''.join(seen)}")
    threading.Thread(target=server.stderr.read, daemon=True).start()  # its console, drained
    yield env, server
    if server.poll() is None:
        server.kill()
    server.wait(timeout=60)


def test_the_repl_goes_on_in_this_process_when_the_server_is_killed(served_home):
    from conftest import Terminal

    env, server = served_home
    with Terminal(["run", "gemma3-270m", "--temperature", "0", "--max-tokens", "4"], env=env) as term:
        term.expect(r"served by http://[\s\S]*>>> ")
        term.send("Monday, Tuesday, Wednesday,")
        term.expect(r"Thursday[\s\S]*>>> ")
        term.send("/ps")
        assert "1 of" in term.expect(r"loaded; budget[\s\S]*>>> ")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=60)
        term.send("Monday, Tuesday, Wednesday,")  # asked again here: one notice, then the answer
        out = " ".join(term.expect(r"Thursday[\s\S]*>>> ").split())  # the notice wraps at the terminal's width
        assert "notice:" in out and "the conversation goes on in this process" in out and "Traceback" not in out
        term.send("/ps")  # the manager of this process now
        assert "unload after" in term.expect(r"unload after[\s\S]*>>> ")
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
