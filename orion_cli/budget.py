"""Memory budgets and pressure: one rule, used by profile, the strategy, the manager, the server and RPC.

A budget is a limit times the high-pressure line, minus what is in use now; pressure compares what is
in use with the limit against the two lines of the tier table (0.75 and 0.90 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .units import format_bytes


@dataclass(frozen=True)
class Budget:
    """How much memory loaded models may take, and the arithmetic behind it.

    Models may fill memory up to the high-pressure line: the budget is the
    limit times the high-pressure fraction, minus what is in use now.
    """

    limit_bytes: int
    in_use_bytes: int
    fraction: float
    budget_bytes: int

    @classmethod
    def compute(cls, limit_bytes: int, in_use_bytes: int, fraction: float) -> "Budget":
        return cls(limit_bytes, in_use_bytes, fraction, max(0, int(limit_bytes * fraction) - in_use_bytes))

    def arithmetic(self) -> str:
        return (
            f"{format_bytes(self.limit_bytes)} limit × {self.fraction:g} (high-pressure line)"
            f" − {format_bytes(self.in_use_bytes)} in use now = {format_bytes(self.budget_bytes)}"
        )


def pressure_level(used_bytes: int, limit_bytes: int, high: float, critical: float) -> str:
    """``normal``, ``high`` (used/limit > high) or ``critical`` (> critical)."""
    ratio = used_bytes / limit_bytes if limit_bytes else 1.0
    if ratio > critical:
        return "critical"
    if ratio > high:
        return "high"
    return "normal"


def pressure_of(memory, high: float, critical: float) -> dict:
    """``{"level", "ratio"}`` of a :class:`orion_cli.device.MemoryNow` (what ``/api/orion/ps`` reports)."""
    return {"level": pressure_level(memory.in_use_bytes, memory.limit_bytes, high, critical),
            "ratio": round(memory.ratio, 3)}


def gpu_budgets(gpus: Sequence, fraction: float, total_cap: int | None = None) -> list[int]:
    """Each GPU's budget, like the RAM budget: its VRAM × the high-pressure line, minus what
    other processes hold there now; scaled down together to ``total_cap`` (the strategy's
    gpu_budget_bytes) where that is lower."""
    budgets = [Budget.compute(g.total_bytes, g.used_bytes, fraction).budget_bytes for g in gpus]
    if total_cap is not None and sum(budgets) > total_cap:
        budgets = [int(b * total_cap / sum(budgets)) for b in budgets]
    return budgets


