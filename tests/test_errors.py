"""Errors keep their type across child processes; the machine's errors (disk, permissions, a
locked store) get their own line and code, never "internal error" (exit 70)."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
from conftest import assert_clean_error

from orion_cli.errors import (
    DoesNotFit,
    EngineFault,
    InvalidValue,
    NotAGGUF,
    NotFound,
    OrionError,
    child_failure,
    error_from_payload,
    error_payload,
    from_os_error,
    from_sqlite_error,
)


@pytest.mark.parametrize("cls", [InvalidValue, NotFound, DoesNotFit, NotAGGUF, EngineFault, OrionError])
def test_round_trip_keeps_the_class(cls):
    back = error_from_payload(error_payload(cls("what went wrong", hint="what to do")))
    assert type(back) is cls and back.one_line() == "what went wrong: what to do"
    assert type(error_from_payload({"class": "NoSuchClass", "error": "x"})) is OrionError


def test_child_deaths():
    oom = child_failure(-9, "evaluating m.gguf")
    assert isinstance(oom, DoesNotFit) and "out of memory" in oom.message and oom.exit_code == 5
    crash = child_failure(-11, "evaluating m.gguf")
    assert isinstance(crash, EngineFault) and "SIGSEGV" in crash.message and crash.exit_code == 8
    assert "exit 3" in child_failure(3, "x").message


def test_os_and_sqlite_errors():
    full = from_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/x"))
    assert isinstance(full, DoesNotFit) and "/data/x" in full.message
    denied = from_os_error(PermissionError(errno.EACCES, "Permission denied", "/root/.config/orion/models.json"))
    assert "Permission denied" in denied.message and "ORION_HOME" in denied.hint and denied.exit_code == 1
    assert isinstance(from_os_error(FileNotFoundError(errno.ENOENT, "No such file", "a")), NotFound)
    locked = from_sqlite_error(sqlite3.OperationalError("database is locked"))
    assert "locked by another orion process" in locked.message


def test_eval_child_error_keeps_its_type(orion, gemma_q4, tmp_path):
    """The eval child's own error (a text shorter than one window) comes back as itself (exit 2)."""
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_clean_error(orion("eval", str(gemma_q4), "--text", str(short), "--ctx", "256"),
                       "fewer than one window", code=2)


def test_a_read_only_home_is_one_line(orion, gemma_q4, tmp_path):
    """A registry orion may not write: the permission, the path and the next step (exit 1, not 70)."""
    if os.geteuid() == 0:
        # root ignores file modes: a folder in the way of the registry's file does the same job
        home = tmp_path / "home"
        (home / "models.json").mkdir(parents=True)
        proc = orion("import", str(gemma_q4), "--name", "g", env={"ORION_HOME": str(home)})
    else:
        home = tmp_path / "home"
        home.mkdir()
        home.chmod(0o500)
        proc = orion("import", str(gemma_q4), "--name", "g", env={"ORION_HOME": str(home)})
    assert proc.returncode not in (0, 70), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


# ---------------------------------------------------------------- children's typed errors (house issue, fault 6)


def _run_child(argv):
    import subprocess
    import sys

    from orion_cli._proc import ErrorChannel

    channel = ErrorChannel()
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli.engine.children", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **channel.popen_kwargs())
    channel.started()
    proc.communicate(timeout=120)
    return proc.returncode, channel.error()


def test_the_quantize_child_reports_a_typed_error(tmp_path):
    """A quantization llama.cpp refuses comes back from the child as NotAGGUF (exit 7), by its class
    over the error channel, not guessed from an exit status."""
    from orion_cli.errors import NotAGGUF

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    code, error = _run_child(["quantize", str(bad), str(tmp_path / "out.gguf"), "Q8_0", "1", "0"])
    assert code == 1 and isinstance(error, NotAGGUF) and error.exit_code == 7
    assert "could not quantize not-a-model.gguf to Q8_0" in error.message


def test_the_rpc_server_child_reports_a_typed_error():
    """llama.cpp's RPC server that cannot serve (here: a port that cannot be bound, a host that is not
    an address) returns; the child says so as RpcServerFailed, which the parent raises as itself."""
    from orion_cli.rpc_endpoints import RpcServerFailed

    code, error = _run_child(["rpc-server", "256.256.256.256", "50052", "1"])
    assert code == 1 and isinstance(error, RpcServerFailed), error
    assert "256.256.256.256:50052" in error.message


def test_a_child_without_a_channel_still_says_what_went_wrong(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    done = subprocess.run([sys.executable, "-m", "orion_cli.engine.children", "quantize", str(bad),
                           str(tmp_path / "o.gguf"), "Q8_0", "1", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "error: llama.cpp could not quantize x.gguf" in done.stderr
