"""One output object for every command: human (Rich; NO_COLOR and non-TTY output respected) or JSON.

The command class (``_options.OrionCommand``) sets :data:`out`'s mode from ``--json`` before a
command runs, so a command hands its result to :meth:`Output.result` instead of branching on a flag.
Rich is imported on first use, so commands that print only YAML or JSON never load it.

Text from files, models, the server or the user is shown as text, whatever it holds:

- a *string* handed to :meth:`Output.text` (or returned by a ``human()``) is a line of Rich markup,
  and every value interpolated into it goes through :func:`escape`;
- anything else (a table, a group, a ``Text``) is text: the consoles have markup off, so a cell or
  a title that holds ``[/]`` or ``[bold]`` is shown as written (style a cell with :func:`styled`);
- the consoles show the ESC of an escape sequence, other control characters and bidi overrides as
  U+FFFD (``orion_cli._text.printable``), in strings, ``Text`` objects, tables and live views alike.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .._text import json_safe, printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


# A pipe or a file gets whole values: Rich would cut lines and table cells at 80 columns there.
PIPE_WIDTH = 10_000


def _console_class() -> type:
    from rich.console import Console
    from rich.segment import Segment

    from .._text import is_printable

    class SafeConsole(Console):
        """A console that never writes a control character it was handed as text (its own styles and
        cursor moves are control segments, and pass)."""

        def render_str(self, text: str, **kwargs):
            return super().render_str(printable(text), **kwargs)

        def render(self, renderable, options=None):
            for segment in super().render(renderable, options):
                if segment.control is None and segment.text and not is_printable(segment.text):
                    yield Segment(printable(segment.text), segment.style)
                else:
                    yield segment

    return SafeConsole


def _console(stderr: bool) -> "Console":
    import os

    cls = _console_class()
    out = cls(stderr=stderr, highlight=False, markup=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = cls(stderr=stderr, highlight=False, markup=False, width=PIPE_WIDTH)
    return out


@lru_cache(maxsize=None)
def console() -> "Console":
    return _console(False)


@lru_cache(maxsize=None)
def err_console() -> "Console":
    return _console(True)


def escape(text: Any) -> str:
    """``text`` shown as is inside Rich markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def styled(text: Any, style: str = "") -> Text:
    """A table cell (or any renderable part) shown as ``text``, in ``style``."""
    from rich.text import Text

    return Text(printable(text), style=style)


def print_markup(target: Console, line: str, **kwargs) -> None:
    """A line of markup; one whose markup is broken (a value that was not escaped) is shown as
    text rather than ending the command."""
    from rich.errors import MarkupError

    try:
        target.print(line, markup=True, **kwargs)
    except MarkupError:
        target.print(line, markup=False, **kwargs)


def _show(target: Console, shown: Any) -> None:
    if isinstance(shown, str):
        print_markup(target, shown)
    else:
        target.print(shown)


def print_json(data: Any) -> None:
    """Stable JSON on stdout, one document, for scripts (C1 and bidi controls as \\u escapes)."""
    import json

    sys.stdout.write(json_safe(json.dumps(data, indent=2, ensure_ascii=False)) + "\n")


class _Status:
    """A spinner line on stderr (``out.status``); its text is text, never markup."""

    def __init__(self, line: str) -> None:
        self._status = err_console().status(styled(line))

    def __enter__(self):
        self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._status.__exit__(*exc)

    def update(self, line: str) -> None:
        self._status.update(styled(line))


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
            _show(console(), shown)

    def text(self, markup: Any = "") -> None:
        """A line of Rich markup (values in it escaped), or a renderable, for people; nothing in JSON mode."""
        if not self.json:
            _show(console(), markup)

    def table(self, columns: Sequence[str | tuple[str, dict]], rows: Sequence[Sequence[Any]], *,
              title: str | None = None) -> None:
        """A borderless table for people; a column is a name or (name, Rich column options). Cells and
        the title are text (a cell that is a Rich ``Text``, from :func:`styled`, keeps its style)."""
        if self.json:
            return
        from rich.table import Table

        t = Table(box=None, pad_edge=False, title=title, title_justify="left")
        for col in columns:
            name, options = (col, {}) if isinstance(col, str) else col
            t.add_column(name, **options)
        for row in rows:
            t.add_row(*(cell if hasattr(cell, "__rich_console__") else str(cell) for cell in row))
        console().print(t)

    def write(self, piece: str) -> None:
        """Streamed text (a model's answer) as it comes, unformatted; nothing in JSON mode. On a
        terminal, control characters in it are shown as U+FFFD (a pipe gets the text exactly)."""
        if not self.json:
            sys.stdout.write(printable(piece) if _stdout_is_terminal() else piece)
            sys.stdout.flush()

    def event(self, doc: dict, human: str) -> None:
        """One event of a long-running command: a compact JSON line, or a line of markup."""
        if self.json:
            import json

            print(json.dumps(doc), flush=True)
        else:
            print_markup(console(), human)

    # ---------------------------------------------------------------- stderr

    def note(self, line: str) -> None:
        """A dim line on stderr: what happens meanwhile (a split, timings, the manager's events)."""
        err_console().print(f"[dim]{escape(line)}[/]", soft_wrap=True, markup=True)

    def notice(self, line: str) -> None:
        err_console().print(f"[yellow]notice:[/] {escape(line)}", soft_wrap=True, markup=True)

    def warning(self, line: str) -> None:
        err_console().print(f"[bold yellow]warning:[/] {escape(line)}", soft_wrap=True, markup=True)

    def error(self, line: str) -> None:
        """The one line of an error: whatever the message holds (a newline, an escape sequence), one line."""
        line = printable(str(line).strip(), one_line=True)
        err_console().print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, markup=True)

    def status(self, line: str) -> _Status:
        """A spinner on stderr while something runs (a context manager; ``update(line)`` changes it)."""
        return _Status(line)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


# The one output object; its mode is set for each command run (never carried over between runs).
out = Output()


def examples(*lines: tuple[str, str]) -> str:
    """An examples block for a command's --help epilog."""
    width = max(len(cmd) for cmd, _ in lines)
    body = "\n".join(f"  {cmd.ljust(width)}   {what}" for cmd, what in lines)
    # \b keeps click from re-wrapping the block
    return f"Examples:\n\n\b\n{body}"
