"""Small file-system helpers every part of orion shares: atomic text writes and timestamps."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InvalidValue


def now_iso() -> str:
    """The current UTC time, to the second, ISO 8601."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader never sees half of it (temporary file, then rename).

    Only a regular file is ever replaced: a symbolic link is followed (its target is written),
    and a device, a FIFO, a socket or a folder at ``path`` is refused, never turned into a file.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    try:
        mode = path.stat().st_mode
    except OSError:  # not there (or unreadable): a new file
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise InvalidValue(f"{path} is {what}: orion only writes regular files",
                           hint="give the path of a file (or '-' where the command can print instead)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
