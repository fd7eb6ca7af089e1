"""How many layers go to the GPU(s): the offload plan, from the estimate alone.

llama.cpp offloads from the top: ``n_gpu_layers`` = k puts the output layer and the last k - 1
repeating layers on the GPUs (k = layers + 1: everything but the input embedding, which stays
on the CPU), the KV cache of each offloaded layer beside it. With several GPUs it cuts the
offloaded layers in proportion to ``tensor_split``; orion passes each GPU's budget there, so
the cut below is the one llama.cpp makes.

:func:`plan_offload` chooses k: with ``auto``, the most layers whose GPU part fits every GPU's
budget (the VRAM that other processes already hold is out of the budget); a number (or -1, all)
is taken as given and checked. The CPU part (:func:`orion_cli.estimate.estimate_memory` with
the same k) is what the RAM budget must hold.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

from .estimate import EngineSettings, Estimate, GPUEstimate, estimate_gpu, estimate_memory, first_gpu_layer
from .gguf_header import GGUFHeader
from .units import format_bytes

AUTO = "auto"


@dataclass(frozen=True)
class OffloadPlan:
    n_gpu_layers: int  # as llama.cpp takes it (0: CPU only; n_layers + 1: all)
    n_total: int  # repeating layers + the output layer
    cpu: Estimate  # what stays in RAM
    gpus: tuple[GPUEstimate, ...]  # one per GPU, in device order
    gpu_budgets: tuple[int, ...]
    tensor_split: tuple[float, ...]  # what llama.cpp is given (empty: one GPU or none)
    requested: str  # "auto", or the number asked for
    reason: str

    @property
    def gpu_bytes(self) -> int:
        return sum(g.total_bytes for g in self.gpus)

    @property
    def full(self) -> bool:
        return self.n_gpu_layers >= self.n_total

    @property
    def gpu_fits(self) -> bool:
        return all(g.total_bytes <= b for g, b in zip(self.gpus, self.gpu_budgets))

    def describe(self) -> str:
        """One line: where the layers go."""
        if not self.gpus or self.n_gpu_layers == 0:
            return f"all {self.n_total} layers on the CPU" + (f" ({self.reason})" if self.reason else "")
        where = "all" if self.full else f"{self.n_gpu_layers} of"
        vram = " + ".join(format_bytes(g.total_bytes) for g in self.gpus)
        budgets = " + ".join(format_bytes(b) for b in self.gpu_budgets)
        return f"{where} {self.n_total} layers on the GPU ({vram} VRAM of {budgets}); {format_bytes(self.cpu.total_bytes)} RAM"

    def to_dict(self) -> dict:
        return {"n_gpu_layers": self.n_gpu_layers, "n_total": self.n_total, "full": self.full,
                "requested": self.requested, "reason": self.reason,
                "gpu_bytes": self.gpu_bytes, "gpus": [g.to_dict() for g in self.gpus],
                "gpu_budgets": list(self.gpu_budgets), "tensor_split": list(self.tensor_split),
                "cpu_bytes": self.cpu.total_bytes}


def _split_points(budgets: Sequence[int]) -> list[float]:
    total = float(sum(budgets)) or 1.0
    points, acc = [], 0.0
    for b in budgets:
        acc += b
        points.append(acc / total)
    return points


def layers_per_gpu(n_layers: int, n_gpu_layers: int, budgets: Sequence[int]) -> list[tuple[int, int]]:
    """[first, last] layer of each GPU (first > last: none), as llama.cpp assigns them: layer il
    goes to the first device whose cumulative split exceeds (il - first offloaded) / offloaded."""
    first = first_gpu_layer(n_layers, n_gpu_layers)
    count = min(n_gpu_layers if n_gpu_layers >= 0 else n_layers + 1, n_layers + 1)
    points = _split_points(budgets)
    owner: dict[int, list[int]] = {i: [] for i in range(len(budgets))}
    for il in range(first, n_layers + 1):
        if count <= 0:
            break
        device = min(bisect_right(points, (il - first) / count), len(budgets) - 1)
        owner[device].append(il)
    return [(min(v), max(v)) if v else (1, 0) for v in owner.values()]


def _gpu_parts(header: GGUFHeader, n_ctx: int, settings: EngineSettings, k: int, budgets: Sequence[int],
               projector: GGUFHeader | None, embedding: bool) -> tuple[GPUEstimate, ...]:
    if k == 0:
        return ()
    parts = []
    for first, last in layers_per_gpu(header.n_layers, k, budgets):
        if first > last:
            parts.append(GPUEstimate((first, last), 0, 0, 0, 0))
        else:
            parts.append(estimate_gpu(header, n_ctx, settings, first, last, projector=projector, embedding=embedding))
    return tuple(parts)


def plan_offload(header: GGUFHeader, n_ctx: int, settings: EngineSettings, gpu_budgets: Sequence[int],
                 requested: int | str = AUTO, *, projector: GGUFHeader | None = None,
                 embedding: bool = False, can_offload: bool = True) -> OffloadPlan:
    """Where the layers of a model go, given each GPU's budget (bytes; empty: no GPU)."""
    n_total = header.n_layers + 1
    budgets = tuple(int(b) for b in gpu_budgets)
    split = tuple(round(b / sum(budgets), 4) for b in budgets) if len(budgets) > 1 and sum(budgets) else ()
    reason = ""
    if not budgets:
        k, reason = 0, "no GPU"
    elif not can_offload:
        k, reason = 0, "this llama.cpp build cannot offload"
    elif requested == AUTO:
        k = 0
        for candidate in range(n_total, 0, -1):
            parts = _gpu_parts(header, n_ctx, settings, candidate, budgets, projector, embedding)
            if all(p.total_bytes <= b for p, b in zip(parts, budgets)):
                k = candidate
                break
        reason = "chosen to fit the GPU budget" if k else "not one layer fits the GPU budget"
    else:
        asked = int(requested)
        k = n_total if asked < 0 else min(asked, n_total)
        reason = "--gpu-layers / n_gpu_layers"
    gpus = _gpu_parts(header, n_ctx, settings, k, budgets, projector, embedding)
    cpu = estimate_memory(header, n_ctx, settings, projector=projector, n_gpu_layers=k)
    return OffloadPlan(k, n_total, cpu, gpus, budgets, split if k else (),
                       str(requested), reason)
