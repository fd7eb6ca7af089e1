"""Child processes that never outlive orion, and the partial files a killed run leaves behind.

- :func:`die_with_parent`: a ``preexec_fn`` that has Linux kill the child (SIGKILL) when the orion
  process that started it dies, however it dies (``kill -9`` included); elsewhere a no-op. Linux
  sends it when the forking *thread* ends: :func:`popen_dying_with_process` starts children from one
  thread that lives as long as the process (a server's worker threads end when idle).
- :func:`remove_stale_partials`: the ``.NAME.PID.partial`` files of runs whose process is gone
  (orion writes every output under such a name, then renames it whole).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
_SPAWNER_LOCK = __import__("threading").Lock()


def die_with_parent() -> None:
    """In a child, before exec: ask the kernel for SIGKILL when the parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not glibc: the child may outlive a killed parent
        pass


_SPAWNER = None


def popen_dying_with_process(args, **kwargs):
    """``subprocess.Popen(args, **kwargs)`` for a child that must die with this process, from any thread.

    The kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child ends, not the process:
    a child started from a worker thread (a server's, which ends when idle) is killed with it. So the
    child is started from one thread that lives as long as the process."""
    import queue
    import subprocess
    import threading

    global _SPAWNER
    if _SPAWNER is None:
        jobs: queue.Queue = queue.Queue()

        def spawner() -> None:
            while True:
                job_args, job_kwargs, answer = jobs.get()
                try:
                    answer.put((True, subprocess.Popen(job_args, preexec_fn=die_with_parent, **job_kwargs)))
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    answer.put((False, exc))

        with _SPAWNER_LOCK:
            if _SPAWNER is None:
                threading.Thread(target=spawner, name="orion-spawner", daemon=True).start()
                _SPAWNER = jobs
    answer: queue.Queue = queue.Queue()
    _SPAWNER.put((args, kwargs, answer))
    ok, value = answer.get()
    if not ok:
        raise value
    return value


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(folder: Path, name: str) -> list[Path]:
    """Delete ``folder/.NAME.PID.partial`` files whose process no longer runs; returns them."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.partial$")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        m = pattern.match(path.name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------- typed errors across processes

ERROR_FD_VAR = "ORION_ERROR_FD"


def report_error(exc, fd: str | None = None) -> None:
    """In a child: the error (an OrionError) as class, message and hint, on the parent's channel
    (:class:`ErrorChannel`; ``fd``: its number, default ``ORION_ERROR_FD``); without one, one line on stderr."""
    import json

    from .errors import error_payload

    fd = os.environ.get(ERROR_FD_VAR, "") if fd is None else fd
    if fd.isdigit():
        try:
            os.write(int(fd), json.dumps(error_payload(exc)).encode())
            return
        except OSError:
            pass
    sys.stderr.write(f"error: {exc.one_line()}\n")


class ErrorChannel:
    """The parent's end of a child's typed errors: a pipe whose write end the child inherits (its
    number in ``ORION_ERROR_FD``). Give :meth:`popen_kwargs` to ``subprocess.Popen``, call
    :meth:`started` once it runs, and :meth:`error` once it has exited."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def popen_kwargs(self, env: dict | None = None) -> dict:
        return {"pass_fds": (self._w,), "env": dict(env if env is not None else os.environ, **{ERROR_FD_VAR: str(self._w)})}

    def started(self) -> None:
        """Close this process's copy of the write end (the child has its own)."""
        if self._w >= 0:
            os.close(self._w)
            self._w = -1

    def error(self):
        """The error the child reported (its own class), or None; call after the child has exited (the
        read ends when every copy of the write end is closed: the children orion starts start none)."""
        import json

        from .errors import error_from_payload

        self.started()
        chunks = []
        while True:
            data = os.read(self._r, 65536)
            if not data:
                break
            chunks.append(data)
        os.close(self._r)
        self._r = -1
        try:
            doc = json.loads(b"".join(chunks))
        except ValueError:
            return None
        return error_from_payload(doc) if isinstance(doc, dict) else None

    def close(self) -> None:
        self.started()
        if self._r >= 0:
            os.close(self._r)
            self._r = -1
