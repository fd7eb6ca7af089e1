"""One output object for every command: human (Rich; NO_COLOR and non-TTY output respected) or JSON.

The command class (``_options.OrionCommand``) sets :data:`out`'s mode from ``--json`` before a
command runs, so a command hands its result to :meth:`Output.result` instead of branching on a flag.
Rich is imported on first use, so commands that print only YAML or JSON never load it.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

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


def escape(text: str) -> str:
    """``text`` shown as is inside Rich markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def print_json(data: Any) -> None:
    """Stable JSON on stdout, one document, for scripts."""
    import json

    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class Output:
    """Where a command's output goes. Mode "human": Rich text and tables on stdout; mode "json":
    one JSON document (or one line per event) on stdout and no human text there. Notices, warnings,
    notes and errors go to stderr in both modes, so stdout stays parseable."""

    def __init__(self) -> None:
        self.mode = "human"

    def set_mode(self, mode: str = "human") -> None:
        if mode not in ("human", "json"):
            raise ValueError(f"unknown output mode {mode!r}")
        self.mode = mode

    @property
    def json(self) -> bool:
        return self.mode == "json"

    # ---------------------------------------------------------------- stdout

    def result(self, data: Any, human: Callable[[], Any] | None = None) -> None:
        """The command's result: ``data`` as JSON, or ``human()`` for people (what it returns, if
        anything, is printed: a line of markup, a table)."""
        if self.json:
            print_json(data)
            return
        shown = human() if human is not None else None
        if shown is not None:
            console().print(shown)

    def text(self, markup: Any = "") -> None:
        """A line of Rich markup (or a renderable) for people; nothing in JSON mode."""
        if not self.json:
            console().print(markup)

    def table(self, columns: Sequence[str | tuple[str, dict]], rows: Sequence[Sequence[Any]], *,
              title: str | None = None) -> None:
        """A borderless table for people; a column is a name or (name, Rich column options)."""
        if self.json:
            return
        from rich.table import Table

        t = Table(box=None, pad_edge=False, title=title, title_justify="left")
        for col in columns:
            name, options = (col, {}) if isinstance(col, str) else col
            t.add_column(name, **options)
        for row in rows:
            t.add_row(*(str(cell) for cell in row))
        console().print(t)

    def write(self, piece: str) -> None:
        """Streamed text (a model's answer) as it comes, unformatted; nothing in JSON mode."""
        if not self.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def event(self, doc: dict, human: str) -> None:
        """One event of a long-running command: a compact JSON line, or a line of markup."""
        if self.json:
            import json

            print(json.dumps(doc), flush=True)
        else:
            console().print(human)

    # ---------------------------------------------------------------- stderr

    def note(self, line: str) -> None:
        """A dim line on stderr: what happens meanwhile (a split, timings, the manager's events)."""
        err_console().print(f"[dim]{escape(line)}[/]")

    def notice(self, line: str) -> None:
        err_console().print(f"[yellow]notice:[/] {escape(line)}")

    def warning(self, line: str) -> None:
        err_console().print(f"[bold yellow]warning:[/] {escape(line)}")

    def error(self, line: str) -> None:
        err_console().print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)

    def status(self, line: str):
        """A spinner on stderr while something runs (a context manager)."""
        return err_console().status(line)


# The one output object; its mode is set for each command run (never carried over between runs).
out = Output()


def examples(*lines: tuple[str, str]) -> str:
    """An examples block for a command's --help epilog."""
    width = max(len(cmd) for cmd, _ in lines)
    body = "\n".join(f"  {cmd.ljust(width)}   {what}" for cmd, what in lines)
    # \b keeps click from re-wrapping the block
    return f"Examples:\n\n\b\n{body}"
