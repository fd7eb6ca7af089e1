"""Two GPUs in one machine, simulated (issue 26's part that needs no second GPU): the offload plan over
two budgets, even and uneven (one GPU half held by another process), and the model manager accounting
each GPU apart, so that the model evicted for a load is one that frees memory on the GPU that lacks it.
The figures on real hardware need a two-GPU machine (bench/estimate.py --device gpu there)."""

from __future__ import annotations

import pytest
from test_offload import GPU_SETTINGS, llama_header

from orion_cli.budget import gpu_budgets
from orion_cli.device import GPUInfo
from orion_cli.manager import ModelDoesNotFit, ModelManager, Request
from orion_cli.offload import plan_offload

GiB = 1024**3
MiB = 1024**2


def gpu(index: int, total_gib: float, used_gib: float) -> GPUInfo:
    total = int(total_gib * GiB)
    return GPUInfo(index=index, name="simulated", total_bytes=total, free_bytes=total - int(used_gib * GiB))


def test_a_model_too_big_for_one_gpu_is_split_over_both_by_their_budgets():
    h = llama_header(n_layers=32, n_embd=4096, n_ff=14336)  # an 8B shape
    whole = plan_offload(h, 8192, GPU_SETTINGS, [100 * GiB]).gpus[0].total_bytes
    half = int(whole * 0.6)  # neither GPU holds it alone; together they do
    plan = plan_offload(h, 8192, GPU_SETTINGS, [half, half])
    assert plan.full and plan.gpu_fits and len(plan.gpus) == 2
    assert plan.tensor_split == (0.5, 0.5)
    (a0, b0), (a1, b1) = (g.layers for g in plan.gpus)
    assert a0 == 0 and b0 + 1 == a1 and b1 == 32  # contiguous, the output layer on the last GPU
    assert all(g.total_bytes <= half for g in plan.gpus)
    assert sum(g.weights_bytes for g in plan.gpus) == pytest.approx(plan.gpus[0].weights_bytes * 2, rel=0.1)


def test_uneven_budgets_move_layers_as_the_estimate_says():
    """One GPU half used by another process: its budget is smaller, and the split gives it fewer layers,
    each GPU's estimate within its own budget."""
    h = llama_header(n_layers=32, n_embd=4096, n_ff=14336)
    free, busy = gpu(0, 24, 0.5), gpu(1, 24, 12)
    budgets = gpu_budgets([free, busy], 0.75)
    assert budgets[0] > budgets[1] > 0  # 24 GB × 0.75 − what others hold
    whole = plan_offload(h, 8192, GPU_SETTINGS, [100 * GiB]).gpus[0].total_bytes
    scale = whole / (budgets[0] + budgets[1]) / 0.85  # the model takes 85 % of the two budgets together
    budgets = [int(b * scale) for b in budgets]
    plan = plan_offload(h, 8192, GPU_SETTINGS, budgets)
    assert plan.full and plan.gpu_fits
    first, second = plan.gpus
    n_first, n_second = (g.layers[1] - g.layers[0] + 1 for g in plan.gpus)
    assert n_first > n_second  # the GPU with more room takes more layers
    assert first.total_bytes <= budgets[0] and second.total_bytes <= budgets[1]
    assert plan.tensor_split[0] > plan.tensor_split[1]
    # the budgets' proportion overloads GPU 1 (it gets the output layer: the vocabulary's matrix and the
    # logits), so the plan gives each GPU the layers that fit it, as counts llama.cpp cuts at exactly
    assert sum(plan.tensor_split) == plan.n_gpu_layers == 33
    assert (n_first, n_second) == plan.tensor_split
    even = plan_offload(h, 8192, GPU_SETTINGS, [sum(budgets) // 2] * 2)
    assert (even.gpus[0].layers[1] - even.gpus[0].layers[0] + 1) < n_first


class Model:
    def close(self):
        pass


def request(key: str, parts: tuple[int, ...], ram: int = 1 * GiB) -> Request:
    return Request(key, key, ram, lambda cancel: Model(), gpu_bytes=sum(parts), gpu_parts=parts)


def test_the_manager_counts_each_gpu_and_evicts_from_the_one_that_lacks_room():
    m = ModelManager(max_models=8, budget_bytes=64 * GiB, keep_alive_s=None, gpu_budgets=[10 * GiB, 10 * GiB])
    assert m.gpu_budget_bytes == 20 * GiB
    m.load(request("on0", (6 * GiB, 0)))
    m.load(request("on1", (0, 6 * GiB)))
    m.load(request("small1", (0, 1 * GiB)))
    # 4 GB more on GPU 1: 7 + 4 > 10 there, though the total (13 + 4 of 20) fits. The least recently
    # used model is on0, which frees nothing on GPU 1: on1 (the next one holding GPU 1) goes
    m.load(request("need1", (0, 4 * GiB)))
    assert sorted(s.name for s in m.status()) == ["need1", "on0", "small1"]
    evicted = [e for e in m.events if e.kind == "evicted"]
    assert [e.key for e in evicted] == ["on1"]
    # a part above one GPU's own budget is refused, naming that GPU
    with pytest.raises(ModelDoesNotFit, match="on GPU 0, its budget is 10.0 GiB"):
        m.load(request("huge0", (11 * GiB, 0)))
    # nothing idle on GPU 0 to free: refused, naming the GPU and what is in use there
    m.pin("on0")
    with pytest.raises(ModelDoesNotFit, match="on GPU 0, where 6.0 GiB of 10.0 GiB is in use"):
        m.load(request("need0", (5 * GiB, 0)))
    assert sorted(s.name for s in m.status()) == ["need1", "on0", "small1"]  # nothing was evicted for it


def test_a_split_model_is_evicted_for_either_gpu_and_the_ps_document_shows_each():
    m = ModelManager(max_models=8, budget_bytes=64 * GiB, keep_alive_s=None, gpu_budgets=[8 * GiB, 4 * GiB])
    m.load(request("split", (5 * GiB, 3 * GiB)))
    m.load(request("other0", (2 * GiB, 0)))
    m.load(request("gpu1", (0, 2 * GiB)))  # 3 + 2 > 4 on GPU 1: split holds GPU 1, other0 does not
    assert sorted(s.name for s in m.status()) == ["gpu1", "other0"]
    from orion_cli.device import MemoryNow
    from orion_cli.ledger import gpu_device
    from orion_cli.server.machine import machine_document

    statuses = m.status()
    doc = machine_document(_strategy(), MemoryNow(64 * GiB, 8 * GiB, "physical RAM"), [gpu(0, 16, 2), gpu(1, 16, 2)],
                           statuses, m.gpu_budgets)
    rows = {g["index"]: g for g in doc["gpus"]}
    assert rows[0]["orion_bytes"] == 2 * GiB and rows[1]["orion_bytes"] == 2 * GiB
    assert rows[0]["budget_bytes"] == 8 * GiB and rows[1]["budget_bytes"] == 4 * GiB
    assert sum(s.memory.on(gpu_device(1)) for s in statuses) == 2 * GiB


def _strategy():
    from pathlib import Path

    from orion_cli.strategy import load_strategy

    return load_strategy({"memory_budget_bytes": 64 * GiB}, env={}, path=Path("/nonexistent/strategy.yaml"))
