"""The numbers orion takes, and the range of each: one table for the command line, the ``ORION_*``
variables, the strategy file and the server.

A number orion cannot hold (a 400-digit integer, ``nan``, ``inf``, ``1e400``) is refused in one
line before anything runs, never carried to llama.cpp, a sleep, a socket or SQLite. The sampling
ranges are the server's too (``server/openai.py``), so ``orion run`` refuses what the server would.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ._text import clip
from .errors import InvalidValue

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

MIN_CTX = 64
# Past every model's trained context (the longest are a few million tokens); llama.cpp counts cells in 32 bits.
MAX_CTX = 1 << 24
# More threads than this only crash llama.cpp's thread pool (OpenMP: "unable to allocate").
MAX_THREADS = max(8, 4 * (os.cpu_count() or 1))
MAX_MODELS = 1024
# n_gpu_layers: models have at most a few hundred layers; llama.cpp takes an int32.
MAX_GPU_LAYERS = 100_000
# Memory budgets: 1 EiB, far past any machine, and well inside the 64-bit sizes llama.cpp and SQLite use.
MAX_BYTES = 1 << 60
MAX_SEARCH_RESULTS = 10_000
MAX_INTERVAL_S = 86_400.0


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low`` to ``high`` (``low`` itself excluded when ``above``)."""

    low: float
    high: float
    integer: bool = True
    above: bool = False
    example: str = ""
    words: str = ""  # what describe() says, when the bounds alone would say it badly

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int) and value != int(value):
            return False
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def describe(self) -> str:
        if self.words:
            return self.words
        kind = "a whole number" if self.integer else "a number"
        low, high = _num(self.low), _num(self.high)
        where = f"above {low}, at most {high}" if self.above else f"from {low} to {high}"
        return f"{kind} {where}" + (f", such as {self.example}" if self.example else "")

    def check(self, what: str, value, shown: object | None = None):
        """``value`` when it is in the range; else InvalidValue naming ``what`` (a flag) and the range."""
        if self.contains(value):
            return value
        text = clip(value if shown is None else shown)
        if isinstance(value, float) and not math.isfinite(value):
            problem = "is not a finite number"
        else:
            problem = "is out of range"
        raise InvalidValue(f"{what} {text} {problem}", hint=f"give {self.describe()}")


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"


# ---------------------------------------------------------------- sampling: the CLI's and the server's

TEMPERATURE = Range(0.0, 2.0, integer=False, example="0.8")
TOP_P = Range(0.0, 1.0, integer=False, example="0.95")
SEED = Range(INT64_MIN, INT64_MAX)
# presence_penalty and frequency_penalty: OpenAI's range (subtracted from a token's logit once it has
# appeared, and for each time it has)
PENALTY = Range(-2.0, 2.0, integer=False, example="0.5")


def max_tokens_range(n_ctx: int) -> Range:
    """``max_tokens``: at least one, at most the context."""
    return Range(1, max(1, n_ctx), example="256")


# ---------------------------------------------------------------- command-line options, by parameter name

# Checked as the command line is parsed, before the command runs (so before a server, the Hub or
# llama.cpp is asked). A command checks more where it knows more (run: --max-tokens against the
# context). A number option not named here still gets a finite value within 64 bits (ANY_INT, ANY_FLOAT).
OPTIONS: dict[str, Range] = {
    "ctx": Range(MIN_CTX, MAX_CTX, example="4096"),
    "threads": Range(1, MAX_THREADS, example="4"),
    "max_models": Range(1, MAX_MODELS, example="2"),
    "max_tokens": Range(1, MAX_CTX, example="256"),
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "seed": SEED,
    "n": Range(1, MAX_SEARCH_RESULTS, example="5"),
    "interval": Range(0.0, MAX_INTERVAL_S, integer=False, above=True, example="1"),
}
ANY_INT = Range(INT64_MIN, INT64_MAX, words="a whole number that fits 64 bits")
ANY_FLOAT = Range(-1e300, 1e300, integer=False, words="a finite number")


def option_range(name: str, integer: bool) -> Range:
    """The range of the number option whose parameter is ``name``."""
    return OPTIONS.get(name) or (ANY_INT if integer else ANY_FLOAT)
