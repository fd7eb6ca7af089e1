"""Text from files, models, the server or the user, made safe to show on a terminal.

A file name, a GGUF's metadata, a registry entry or a server's message can hold the ESC of an
escape sequence (one that clears the screen, moves the cursor, sets the window title), other C0
and C1 control characters, or a bidi override that shows text in another order than it is.
:func:`printable` turns each into U+FFFD, visibly; the CLI's output layer and the server's log
line pass every text through it. :func:`clip` keeps a value echoed in a message short.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls, the bidi embeddings, overrides and isolates
# (and the marks that steer them), the line and paragraph separators.
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}]")
_UNSAFE_ONE_LINE_RE = re.compile(f"[{_UNSAFE}\n]")
REPLACEMENT = "\ufffd"


def printable(text: object, *, one_line: bool = False) -> str:
    """``text`` with every control character, bidi control and line separator shown as U+FFFD;
    tabs and newlines stay (``one_line``: newlines go too, for a line that must stay one)."""
    text = str(text)
    pattern = _UNSAFE_ONE_LINE_RE if one_line else _UNSAFE_RE
    return pattern.sub(REPLACEMENT, text) if pattern.search(text) else text


def is_printable(text: str) -> bool:
    """Whether :func:`printable` would leave ``text`` as it is."""
    return _UNSAFE_RE.search(text) is None


def json_safe(text: str) -> str:
    """A JSON document with the characters :func:`printable` replaces written as ``\\u`` escapes (four hex digits)
    (the same data: JSON escapes C0 controls already, but not DEL, C1 controls or bidi controls)."""
    return _UNSAFE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def clip(value: object, limit: int = 40) -> str:
    """``value`` as text, cut to about ``limit`` characters: a 400-digit number in an error line
    becomes its first digits and its length."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 12]}... ({len(text)} characters)"
