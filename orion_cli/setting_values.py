"""The strategy's settings checked and converted: :func:`coerce_setting` (one rule for the strategy
file, the ``ORION_*`` variables and the flags), each whole-number setting bounded (:data:`MAXIMA`)."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from ._text import clip
from .errors import InvalidValue
from .limits import MAX_BYTES, MAX_CTX, MAX_GPU_LAYERS, MAX_MODELS, MAX_THREADS, MIN_CTX
from .quant_types import LEVELS as QUANT_LEVELS
from .units import parse_keep_alive, parse_size

if TYPE_CHECKING:
    from .tiers import TierTable

# The largest value of each whole-number setting (orion_cli.limits: the command line's too), and why.
MAXIMA = {
    "max_models": (MAX_MODELS, ""),
    "n_ctx": (MAX_CTX, "past every model's trained context"),
    "threads": (MAX_THREADS, f"4 × this machine's {os.cpu_count() or 1} CPUs; llama.cpp cannot start more"),
    "n_gpu_layers": (MAX_GPU_LAYERS, ""),
    "memory_budget_bytes": (MAX_BYTES, "1 EiB"),
    "gpu_budget_bytes": (MAX_BYTES, "1 EiB"),
}


_WHOLE_RE = None


def _as_int(value: Any, minimum: int) -> int | None:
    """A whole number ≥ ``minimum`` from an int or its ASCII decimal digits; None for anything else.
    A string of more than 30 digits is taken as "too large" (2**100): int() is never handed 5,000 of them."""
    global _WHOLE_RE
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if _WHOLE_RE is None:
            import re

            _WHOLE_RE = re.compile(r"[+-]?[0-9]+")
        text = value.strip()
        if not _WHOLE_RE.fullmatch(text):
            return None
        digits = text.lstrip("+-")
        value = int(text) if len(digits) <= 30 else (-1 if text.startswith("-") else 1) * 2**100
    if isinstance(value, int):
        return value if value >= minimum else None
    return None


def _at_most(key: str, n: int) -> int:
    """``n``, when it is at most the setting's maximum (MAXIMA); raises ValueError saying the maximum."""
    maximum, why = MAXIMA[key]
    if n > maximum:
        raise ValueError(f"at most {maximum}" + (f" ({why})" if why else ""))
    return n


_DECIMAL = re.compile(r"[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def coerce_setting(key: str, value: Any, *, table: TierTable) -> Any:
    """A setting's value checked and converted; raises ValueError with what was expected."""
    if key == "tier":
        if isinstance(value, str) and value.strip().lower() in table.names:
            return value.strip().lower()
        raise ValueError(f"one of {', '.join(table.names)}")
    if key == "quantization":
        if isinstance(value, str) and value.strip().lower() in QUANT_LEVELS:
            return value.strip().lower()
        raise ValueError(f"one of {', '.join(QUANT_LEVELS)}")
    if key == "max_kld":
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower() in ("null", "none", ""):
            return None
        x = None
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            x = float(value.strip())  # (float() alone takes 1_0, fullwidth digits, nan)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                x = float(value)
            except OverflowError:
                x = None
        if x is None or not (0 <= x <= 1e6):
            raise ValueError("a mean KL divergence from 0 to 1e6 (such as 0.05), or null")
        return x + 0.0  # -0 is 0
    if key in ("max_models", "threads", "n_ctx"):
        minimum = MIN_CTX if key == "n_ctx" else 1
        n = _as_int(value, minimum)
        if n is None:
            raise ValueError(f"a whole number ≥ {minimum}")
        return _at_most(key, n)
    if key == "n_gpu_layers":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        n = _as_int(value, -1)
        if n is None:
            raise ValueError("auto or a whole number ≥ -1 (auto = as many as fit the GPU budget, -1 = all, 0 = CPU only)")
        return _at_most(key, n)
    if key == "keep_alive_s":
        if value is None:
            return None
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return parse_keep_alive(value)
            except InvalidValue as exc:
                if "longer than a year" in exc.message:
                    raise ValueError("at most a year (365 days, 8760h), or null/'never'") from None
        raise ValueError("seconds (300), a duration (5m, 1h) or null/'never'")
    if key in ("memory_budget_bytes", "gpu_budget_bytes"):
        if value is None and key == "gpu_budget_bytes":
            return None
        n = _as_int(value, 0)
        if n is None and isinstance(value, str):
            try:
                n = parse_size(value)
            except InvalidValue:
                pass
        if n is not None:
            return _at_most(key, n)
        raise ValueError("a byte count or a size like 6GB")
    if key == "kv_type":
        return parse_kv_type(value)
    if key == "rpc_servers":
        if value is None or value == [] or value == "":  # the usual case: no import (start-up time)
            return ()
        from .rpc_endpoints import format_rpc_servers, parse_rpc_servers

        if not isinstance(value, (str, list, tuple)):
            raise ValueError("host:port[=SIZE] entries, comma-separated (127.0.0.1:50052,box:50052=6GB)")
        return tuple(format_rpc_servers(parse_rpc_servers(value)))
    raise KeyError(key)


def kv_type_choices() -> str:
    """What a KV cache type setting takes, as error lines and help say it."""
    from .estimate import KV_TYPES

    return f"one of {', '.join(KV_TYPES)} (for K and V), or K/V such as q8_0/q4_0"


def parse_kv_type(value: Any) -> tuple[str, str]:
    """The KV cache's (K type, V type) from one type for both (``q8_0``) or ``K/V`` (``q8_0/q4_0``),
    each one of :data:`orion_cli.estimate.KV_TYPES`; raises ValueError with the choices."""
    from .estimate import KV_TYPES

    if isinstance(value, (list, tuple)) and len(value) == 2:  # an already parsed pair
        parts = list(value)
    elif isinstance(value, str):
        parts = value.split("/")
        parts = parts * 2 if len(parts) == 1 else parts
    else:
        parts = []
    pair = tuple(p.strip().lower() if isinstance(p, str) else None for p in parts)
    if len(pair) != 2 or not all(p in KV_TYPES for p in pair):
        raise ValueError(kv_type_choices())
    return pair  # type: ignore[return-value]


def format_kv_type(pair: tuple[str, str]) -> str:
    """A KV type pair as the strategy file and the output write it: ``q8_0``, or ``K/V`` when they differ."""
    return pair[0] if pair[0] == pair[1] else f"{pair[0]}/{pair[1]}"


def _shown(value: Any) -> str:
    """A value as an error line echoes it: JSON (a string quoted), cut to a few dozen characters."""
    import json

    try:
        text = json.dumps(value) if not isinstance(value, str) else repr(value)
    except (TypeError, ValueError):  # a YAML value JSON has no spelling for (a date, a set)
        text = repr(value)
    return clip(text, 60)
