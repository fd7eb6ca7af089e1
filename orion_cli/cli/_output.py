"""Consoles for people (Rich; NO_COLOR and non-TTY output respected) and JSON for scripts.

Rich is imported on first use, so commands that print only YAML or JSON never load it.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


# A pipe or a file gets whole values: Rich would cut lines and table cells at 80 columns there.
PIPE_WIDTH = 10_000


def _console(stderr: bool) -> "Console":
    import os

    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(stderr=stderr, highlight=False, width=PIPE_WIDTH)
    return out


@lru_cache(maxsize=None)
def console() -> "Console":
    return _console(False)


@lru_cache(maxsize=None)
def err_console() -> "Console":
    return _console(True)


def printable(text: str) -> str:
    """Text from files, safe for a terminal: control characters (the ESC of an escape sequence that
    would clear the screen or move the cursor, C1 controls) become U+FFFD; tabs and newlines stay."""
    return "".join(c if c in "\t\n" or not (ord(c) < 32 or 0x7F <= ord(c) < 0xA0) else "\ufffd" for c in text)


def print_json(data: Any) -> None:
    """Stable JSON on stdout, one document, for scripts."""
    import json

    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def examples(*lines: tuple[str, str]) -> str:
    """An examples block for a command's --help epilog."""
    width = max(len(cmd) for cmd, _ in lines)
    body = "\n".join(f"  {cmd.ljust(width)}   {what}" for cmd, what in lines)
    # \b keeps click from re-wrapping the block
    return f"Examples:\n\n\b\n{body}"
