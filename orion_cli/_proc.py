"""Child processes that never outlive orion, and the partial files a killed run leaves behind.

- :func:`die_with_parent`: a ``preexec_fn`` that has Linux kill the child (SIGKILL) when the orion
  process that started it dies, however it dies (``kill -9`` included); elsewhere a no-op.
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


def die_with_parent() -> None:
    """In a child, before exec: ask the kernel for SIGKILL when the parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not glibc: the child may outlive a killed parent
        pass


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
