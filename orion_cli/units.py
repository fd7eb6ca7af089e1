"""Parsing and printing of sizes and durations.

Memory sizes are binary, as operating systems count RAM: ``1GB`` and ``1GiB``
both mean 1024**3 bytes, so ``--ram 8GB`` describes what an "8 GB laptop"
reports.
"""

from __future__ import annotations

import re

from .errors import InvalidValue

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
# ASCII digits only: ``\d`` alone also takes other scripts' digits (Arabic-Indic, full-width).
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$", re.ASCII)

_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)
_NEVER = {"never", "none", "off", "inf", "-1"}


def _shown(text, limit: int = 40) -> str:
    """A value as an error message quotes it: at most ``limit`` characters (a 401-digit number, a
    megabyte of text: the start of it)."""
    shown = repr(text) if isinstance(text, str) else str(text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``"3GB"``, ``"512MiB"``, ``"1.5G"`` or a plain byte count into bytes."""
    import math

    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise InvalidValue(
            f"{what} {_shown(text)} is not a size",
            hint="write a number with a unit, like 3GB, 512MB or 1.5GiB",
        )
    scaled = float(match.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(scaled) or scaled >= 2**63:  # a 400-digit size: no byte count, not an OverflowError
        raise InvalidValue(f"{what} {_shown(text)} is too large", hint="for example 3GB")
    value = int(scaled)
    if value <= 0:
        raise InvalidValue(f"{what} {_shown(text)} must be larger than zero", hint="for example 3GB")
    return value


# The longest keep-alive orion takes as a number (a year): past it, 'never' says what is meant, and a
# 321-digit number no longer overflows the clock arithmetic of the manager and /api/orion/ps.
MAX_KEEP_ALIVE_S = 365 * 24 * 3600


def _bounded_keep_alive(seconds: float, text, what: str) -> int:
    import math

    if not math.isfinite(seconds) or seconds > MAX_KEEP_ALIVE_S:
        shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
        raise InvalidValue(f"{what} {shown} is longer than a year",
                           hint="give at most 365 days (8760h), or 'never' to keep the model loaded")
    return int(seconds)


_NOT_A_DURATION_HINT = "write seconds (300), minutes (5m), hours (1h) or 'never'"


def parse_keep_alive(text: str | float | None, *, what: str = "keep-alive") -> int | None:
    """Parse a keep-alive: seconds, ``"5m"``, ``"1h"``, or ``"never"`` (returns None); at most a year.

    A negative number of seconds (``-1``) means never, as in Ollama; a number that is not finite
    (``1e400`` read from JSON is infinity) or past a year is refused, never taken for 'never'."""
    import math

    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):  # true, a list, an object
        raise InvalidValue(f"{what} {_shown(text)} is not a duration", hint=_NOT_A_DURATION_HINT)
    if isinstance(text, float):
        if math.isnan(text) or text == -math.inf:
            raise InvalidValue(f"{what} {_shown(text)} is not a duration", hint=_NOT_A_DURATION_HINT)
        if text < 0 and math.isfinite(text):
            return None
        return _bounded_keep_alive(text, text, what)
    if isinstance(text, int):
        if text < 0:
            return None
        return _bounded_keep_alive(float(text) if text <= MAX_KEEP_ALIVE_S else float("inf"), text, what)
    if text.strip().lower() in _NEVER:
        return None
    match = _DURATION_RE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS:
        raise InvalidValue(f"{what} {_shown(text)} is not a duration", hint=_NOT_A_DURATION_HINT)
    return _bounded_keep_alive(float(match.group(1)) * _DURATION_UNITS[unit], text, what)


def format_bytes(n_bytes: float | None) -> str:
    """Format a byte count with binary units: ``3.0 GiB``, ``512 MiB``."""
    if n_bytes is None:
        return "unknown"
    value = float(n_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor:
            scaled = value / factor
            return f"{sign}{scaled:.1f} {unit}" if scaled < 100 else f"{sign}{scaled:.0f} {unit}"
    return f"{sign}{value:.0f} B"


def format_keep_alive(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
