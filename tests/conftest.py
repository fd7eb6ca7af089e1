"""Shared fixtures: an isolated ORION_HOME and a runner for the real `orion` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def orion_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own ORION_HOME and no ORION_* settings from the caller's shell."""
    for var in [v for v in os.environ if v.startswith("ORION_")]:
        monkeypatch.delenv(var)
    home = tmp_path / "orion-home"
    monkeypatch.setenv("ORION_HOME", str(home))
    return home


@pytest.fixture
def orion():
    """Run `orion ARGS...` as a whole process; returns the CompletedProcess."""

    def run(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 120):
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("NO_COLOR", "1")
        full_env["COLUMNS"] = "200"
        return subprocess.run(
            [sys.executable, "-m", "orion_cli", *args],
            capture_output=True, text=True, env=full_env, input=input, timeout=timeout,
        )

    return run


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
