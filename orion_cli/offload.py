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
from dataclasses import dataclass, replace
from typing import Callable, Sequence

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
    devices: tuple[str, ...] = ()  # each device's name where some are other machines' (RPC); else GPUs
    endpoints: tuple[str, ...] = ()  # beside devices: each one's RPC server (host:port), "" for a local GPU
    local_budget: int | None = None  # this machine's RAM budget, where the plan was made against it

    @property
    def gpu_bytes(self) -> int:
        return sum(g.total_bytes for g in self.gpus)

    @property
    def full(self) -> bool:
        return self.n_gpu_layers >= self.n_total

    @property
    def gpu_fits(self) -> bool:
        return _fits(self.gpus, self.gpu_budgets)

    @property
    def remote_parts(self) -> tuple[tuple[str, int, int], ...]:
        """(endpoint, bytes, budget) of each RPC server's device."""
        return tuple((e, g.total_bytes, b) for e, g, b in zip(self.endpoints, self.gpus, self.gpu_budgets) if e)

    @property
    def local_gpu_bytes(self) -> int:
        """VRAM on this machine's GPUs (not the RPC servers')."""
        return sum(g.total_bytes for i, g in enumerate(self.gpus)
                   if not (i < len(self.endpoints) and self.endpoints[i]))

    @property
    def local_fits(self) -> bool:
        return self.local_budget is None or self.cpu.total_bytes <= self.local_budget

    def describe(self) -> str:
        """One line: where the layers go."""
        if self.devices:
            return self._describe_split()
        if not self.gpus or self.n_gpu_layers == 0:
            return f"all {self.n_total} layers on the CPU" + (f" ({self.reason})" if self.reason else "")
        where = "all" if self.full else f"{self.n_gpu_layers} of"
        vram = " + ".join(format_bytes(g.total_bytes) for g in self.gpus)
        budgets = " + ".join(format_bytes(b) for b in self.gpu_budgets)
        return f"{where} {self.n_total} layers on the GPU ({vram} VRAM of {budgets}); {format_bytes(self.cpu.total_bytes)} RAM"

    def _describe_split(self) -> str:
        n = self.n_total - 1
        here = first_gpu_layer(n, self.n_gpu_layers)
        local = ("every layer" if here > n else "the input layer" + (
            f" and layers 0-{here - 1}" if here > 0 else ""))
        budget = f" of {format_bytes(self.local_budget)}" if self.local_budget is not None else ""
        parts = [f"{local} here ({format_bytes(self.cpu.total_bytes)}{budget})"]
        for name, g, b in zip(self.devices, self.gpus, self.gpu_budgets):
            if g.n_layers:
                first, last = g.layers
                if last < n:
                    what = f"layer {first}" if first == last else f"layers {first}-{last}"
                else:  # the output layer is llama.cpp's layer n
                    what = "the output layer" if first == n else (
                        f"layer {first} + output" if first == n - 1 else f"layers {first}-{n - 1} + output")
                parts.append(f"{what} on {name} ({format_bytes(g.total_bytes)} of {format_bytes(b)})")
        return "; ".join(parts)

    def refusal(self) -> str:
        """Why the plan does not fit, with the arithmetic of each machine."""
        rows = [f"this machine {format_bytes(self.cpu.total_bytes)} (budget {format_bytes(self.local_budget or 0)})"]
        rows += [f"{name} {format_bytes(g.total_bytes)} (budget {format_bytes(b)})"
                 for name, g, b in zip(self.devices, self.gpus, self.gpu_budgets)]
        over = [r for r, g_fit in zip(rows, [self.local_fits] + [g.total_bytes <= b for g, b in
                                                                   zip(self.gpus, self.gpu_budgets)]) if not g_fit]
        total = self.cpu.total_bytes + self.gpu_bytes
        budgets = (self.local_budget or 0) + sum(self.gpu_budgets)
        return (f"it needs {format_bytes(total)} where the budgets total {format_bytes(budgets)} ({self.reason}): "
                + " + ".join(rows) + (f"; over: {', '.join(over)}" if over else ""))

    def to_dict(self) -> dict:
        out = {"n_gpu_layers": self.n_gpu_layers, "n_total": self.n_total, "full": self.full,
               "requested": self.requested, "reason": self.reason,
               "gpu_bytes": self.gpu_bytes, "gpus": [g.to_dict() for g in self.gpus],
               "gpu_budgets": list(self.gpu_budgets), "tensor_split": list(self.tensor_split),
               "cpu_bytes": self.cpu.total_bytes}
        if self.devices:
            out["devices"] = list(self.devices)
            out["local_budget"] = self.local_budget
            out["fits"] = self.local_fits and self.gpu_fits
        return out


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


def _greedy_counts(n_layers: int, k: int, budgets: Sequence[int], part_bytes: Callable[[int, int, int], int]) -> list[int]:
    """The top ``k`` layers shared out device by device: each takes as many of the next layers as fit its
    budget (``part_bytes(device, first, last)``); what none could take lands on the last one."""
    counts, at, left = [], first_gpu_layer(n_layers, k), k
    for i, b in enumerate(budgets[:-1]):
        c = 0
        while c < left and part_bytes(i, at, at + c) <= b:
            c += 1
        counts.append(c)
        at, left = at + c, left - c
    counts.append(left)
    return counts


def _fitting_split(header: GGUFHeader, n_ctx: int, settings: EngineSettings, k: int, budgets: Sequence[int],
                   split: tuple, projector: GGUFHeader | None, embedding: bool) -> tuple[tuple[GPUEstimate, ...], tuple]:
    """The parts of the top ``k`` layers over the GPUs and the ``tensor_split`` that gives them: in
    proportion to the budgets where every part fits; else, with several GPUs, each GPU in turn as many
    layers as fit its budget (the output layer, with the vocabulary's matrix and the logits, lands on the
    last GPU, which a proportional cut overloads when that GPU's budget is the smaller), the counts
    then given as ``tensor_split`` (llama.cpp's cut falls exactly there); the proportional parts when
    neither fits."""
    parts = _gpu_parts(header, n_ctx, settings, k, budgets, projector, embedding)
    if len(budgets) < 2 or _fits(parts, budgets):
        return parts, split
    counts = _greedy_counts(header.n_layers, k, budgets, lambda i, first, last: estimate_gpu(
        header, n_ctx, settings, first, last, projector=projector, embedding=embedding).total_bytes)
    greedy = _gpu_parts(header, n_ctx, settings, k, counts, projector, embedding)
    if _fits(greedy, budgets):
        return greedy, tuple(float(c) for c in counts)
    return parts, split


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
            parts, _ = _fitting_split(header, n_ctx, settings, candidate, budgets, split, projector, embedding)
            if _fits(parts, budgets):
                k = candidate
                break
        reason = "chosen to fit the GPU budget" if k else "not one layer fits the GPU budget"
    else:
        asked = int(requested)
        k = n_total if asked < 0 else min(asked, n_total)
        reason = "--gpu-layers / n_gpu_layers"
    gpus, split = _fitting_split(header, n_ctx, settings, k, budgets, split, projector, embedding) if k else ((), split)
    cpu = estimate_memory(header, n_ctx, settings, projector=projector, n_gpu_layers=k)
    return OffloadPlan(k, n_total, cpu, gpus, budgets, split if k else (),
                       str(requested), reason)


# ---------------------------------------------------------------- across machines (RPC)


def _counts_fit(header: GGUFHeader, n_ctx: int, settings: EngineSettings, k: int, counts: Sequence[int],
                budgets: Sequence[int], runtimes: Sequence[int]) -> tuple[GPUEstimate, ...]:
    parts, at = [], first_gpu_layer(header.n_layers, k)
    for c, runtime in zip(counts, runtimes):
        if c == 0:
            parts.append(GPUEstimate((at, at - 1), 0, 0, 0, 0))
        else:
            parts.append(estimate_gpu(header, n_ctx, settings, at, at + c - 1, runtime_bytes=runtime))
        at += c
    return tuple(parts)


def _fits(parts: Sequence[GPUEstimate], budgets: Sequence[int]) -> bool:
    """Whether each device's part fits its budget."""
    return all(p.total_bytes <= b for p, b in zip(parts, budgets))


def split_counts(header: GGUFHeader, n_ctx: int, settings: EngineSettings, k: int, budgets: Sequence[int],
                 runtimes: Sequence[int]) -> tuple[list[int], tuple[GPUEstimate, ...]]:
    """How many of the top ``k`` layers each device takes, in device order: in proportion to the
    budgets where every part then fits, else each device in turn as many as fit its budget. (The
    counts are what orion passes as ``tensor_split``: llama.cpp's cut then falls exactly there.)"""
    total = sum(budgets) or 1
    shares = [k * b / total for b in budgets]
    counts = [int(x) for x in shares]
    for i in sorted(range(len(budgets)), key=lambda i: shares[i] - counts[i], reverse=True)[: k - sum(counts)]:
        counts[i] += 1
    parts = _counts_fit(header, n_ctx, settings, k, counts, budgets, runtimes)
    if _fits(parts, budgets):
        return counts, parts
    greedy = _greedy_counts(header.n_layers, k, budgets, lambda i, first, last: estimate_gpu(
        header, n_ctx, settings, first, last, runtime_bytes=runtimes[i]).total_bytes)
    return greedy, _counts_fit(header, n_ctx, settings, k, greedy, budgets, runtimes)


def plan_split(header: GGUFHeader, n_ctx: int, settings: EngineSettings, local_budget: int,
               budgets: Sequence[int], names: Sequence[str], runtimes: Sequence[int],
               requested: int | str = AUTO, endpoints: Sequence[str] = ()) -> OffloadPlan:
    """Where the layers go across this machine and others (RPC servers; local GPUs after them, as
    llama.cpp orders its devices), from each one's budget. ``auto``: the fewest layers sent away
    that let this machine's part fit its budget (what stays here costs no network), cut between the
    devices so that each part fits; a number is taken as given. The plan says whether it fits
    (``local_fits``, ``gpu_fits``); with ``auto`` and no fit it is the closest one: everything sent
    away, for the arithmetic of the refusal."""
    n_total = header.n_layers + 1

    def local(k: int):
        return estimate_memory(header, n_ctx, settings, n_gpu_layers=k, remote=True)

    def plan(k: int, reason: str, here=None) -> OffloadPlan:
        counts, parts = split_counts(header, n_ctx, settings, k, budgets, runtimes) if k else (
            [0] * len(budgets), tuple(GPUEstimate((1, 0), 0, 0, 0, 0) for _ in budgets))
        return OffloadPlan(k, n_total, here or local(k), parts, tuple(budgets),
                           tuple(float(c) for c in counts) if k else (), str(requested), reason,
                           devices=tuple(names), endpoints=tuple(endpoints), local_budget=local_budget)

    if requested != AUTO:
        asked = int(requested)
        return plan(n_total if asked < 0 else min(asked, n_total), "--gpu-layers / n_gpu_layers")
    for k in range(0, n_total + 1):
        here = local(k)
        if here.total_bytes <= local_budget:
            candidate = plan(k, "the fewest layers away that let this machine's part fit" if k else
                             "it fits this machine: no layer sent away", here)
            if candidate.gpu_fits or k == 0:
                return candidate
            return replace(candidate, reason=f"{k} of {n_total} layers sent away")
    return plan(n_total, "every layer sent away")
