"""Where a model's layers go: this machine's RAM, its GPUs and the strategy's RPC servers, and the
settings the load uses there; an encoder's pool of contexts, sized for where it runs.

The budgets it reads are measured once a process (:func:`gpu_budgets_now`, RPC servers through
:func:`orion_cli.rpc.remote_devices_now`): after this process has loaded a model, a GPU's free
memory no longer counts it (the manager does).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

from ._once import MeasuredOnce
from .cuda_runtime import CUDA_CONTEXT_EXTRA_BYTES
from .errors import InvalidValue
from .strategy import Strategy

GPU_BUDGETS: MeasuredOnce[list[int]] = MeasuredOnce("each GPU's budget, before this process loaded anything")


def gpu_budgets_now(strategy: Strategy) -> list[int]:
    """Each GPU's budget for this process's loads: measured once (before it loads anything, so
    that only other processes' VRAM is taken off), capped by the strategy's gpu_budget_bytes.
    Empty when the strategy has no GPU or keeps models on the CPU."""
    if strategy.gpu_budget_bytes is None or strategy.n_gpu_layers == 0:
        return []
    from .budget import gpu_budgets
    from .device import detect_gpus

    return GPU_BUDGETS.get(strategy.gpu_budget_bytes,
                           lambda: gpu_budgets(detect_gpus(), strategy.pressure_high, strategy.gpu_budget_bytes))


def rpc_requested(strategy: Strategy, gpu_layers=None):
    """The layers to send away: --gpu-layers as given; else auto, unless the strategy names a count
    (its 0, written for a machine without a GPU, means no GPU, not 'nothing to the servers')."""
    from .offload import AUTO

    if gpu_layers is not None:
        return gpu_layers
    if strategy.sources.get("n_gpu_layers") == "flag" or strategy.n_gpu_layers not in (0, AUTO):
        return strategy.n_gpu_layers
    return AUTO


def split_plan(header, n_ctx: int, strategy: Strategy, settings, *, gpu_budgets: Sequence[int] = (),
               remote=None, gpu_layers=None):
    """Where a model's layers go across this machine (RAM, then its GPUs) and the strategy's RPC
    servers (``remote``: their devices; default: asked now, once a process)."""
    from .cuda_runtime import CUDA_CONTEXT_BYTES
    from .offload import plan_split
    from .rpc import remote_devices_now
    from .rpc_endpoints import parse_rpc_servers

    if remote is None:
        remote = remote_devices_now(parse_rpc_servers(strategy.rpc_servers), strategy.pressure_high)
    budgets = [d.budget_bytes for d in remote] + list(gpu_budgets)
    names = [d.name for d in remote] + [f"GPU {i}" for i in range(len(gpu_budgets))]
    runtimes = [0] * len(remote) + [CUDA_CONTEXT_BYTES] * len(gpu_budgets)
    endpoints = [d.server.endpoint for d in remote] + [""] * len(gpu_budgets)
    return plan_split(header, n_ctx, settings, strategy.memory_budget_bytes, budgets, names, runtimes,
                      rpc_requested(strategy, gpu_layers), endpoints)


def rpc_settings(settings):
    """The settings of a model split over RPC: no repacked weights here either, since an RPC server's
    layers run ggml's plain kernels. Every layer then computes the same wherever it lives, and the
    answer does not depend on the split."""
    return replace(settings, repack=False, amx=False)


def with_kv_types(settings, strategy: Strategy, *, embedding: bool = False):
    """``settings`` with the strategy's KV cache types (an encoder has no KV cache: left f16), so that
    the estimate, the offload plan and the load all see the same cache."""
    if embedding:
        return settings
    from .engine.settings import kv_settings

    return kv_settings(settings, *strategy.kv_type)


def offload_plan(header, n_ctx: int, strategy: Strategy, check, *, embedding: bool = False,
                 projector=None, gpu_budgets: list[int] | None = None, gpu_layers=None):
    """Where a model's layers go on this machine (and the strategy's RPC servers, for an LLM), and
    the settings it loads with (the strategy's KV cache types among them)."""
    from . import engine
    from .offload import plan_offload

    if strategy.rpc_servers and not embedding:
        if not engine.rpc_supported():
            from .rpc_endpoints import rpc_unsupported

            raise rpc_unsupported()
        if projector is not None:
            raise InvalidValue("orion does not split a vision model over RPC servers yet",
                               hint="run it on this machine (without --rpc / ORION_RPC)")
        gpus = gpu_budgets_now(strategy) if gpu_budgets is None else gpu_budgets
        gpus = gpus if check.gpu_offload else []
        settings = with_kv_types(rpc_settings(engine.settings_for(check, offload=bool(gpus))), strategy)
        from .rpc import usable_devices_now
        from .rpc_endpoints import parse_rpc_servers

        remote, failed = usable_devices_now(parse_rpc_servers(strategy.rpc_servers), strategy.pressure_high)
        if failed:
            return _without(failed, remote, header, n_ctx, strategy, check, gpu_budgets, gpu_layers)
        plan = split_plan(header, n_ctx, strategy, settings, gpu_budgets=gpus, remote=remote, gpu_layers=gpu_layers)
        if plan.n_gpu_layers or not plan.local_fits:
            return plan, settings
        # nothing goes away: this machine's own settings (repacking, AMX), where they fit too
        here, own = offload_plan(header, n_ctx, replace(strategy, rpc_servers=()), check, gpu_budgets=gpu_budgets,
                                 gpu_layers=gpu_layers)
        if here.cpu.total_bytes <= strategy.memory_budget_bytes and here.gpu_fits:
            return here, own
        return plan, settings
    budgets = gpu_budgets_now(strategy) if gpu_budgets is None else gpu_budgets
    requested = strategy.n_gpu_layers if gpu_layers is None else gpu_layers
    if budgets and check.gpu_offload and requested != 0:
        settings = with_kv_types(engine.settings_for(check, embedding=embedding, offload=True), strategy,
                                 embedding=embedding)
        plan = plan_offload(header, n_ctx, settings, budgets, requested, projector=projector, embedding=embedding)
        if plan.n_gpu_layers:
            return plan, settings
    settings = with_kv_types(engine.settings_for(check, embedding=embedding), strategy, embedding=embedding)
    return plan_offload(header, n_ctx, settings, budgets, 0 if budgets else requested, projector=projector,
                        embedding=embedding, can_offload=check.gpu_offload), settings


def _fits(plan, strategy: Strategy) -> bool:
    if plan.devices:  # a split: this machine's part and each server's
        return plan.local_fits and plan.gpu_fits
    return plan.cpu.total_bytes <= strategy.memory_budget_bytes and plan.gpu_fits


def _without(failed, remote, header, n_ctx: int, strategy: Strategy, check, gpu_budgets, gpu_layers):
    """The plan without the RPC servers that cannot be used now (unreachable, busy, not an RPC
    server): on the others, or on this machine alone, where the model fits there, with one warning
    line naming each server left out; else one error, the servers' and the arithmetic's."""
    from .rpc import RpcServerUnavailable, one_error, warn
    from .rpc_endpoints import format_rpc_servers
    from .units import format_bytes

    servers = tuple(dict.fromkeys(d.server for d in remote))
    plan, settings = offload_plan(header, n_ctx, replace(strategy, rpc_servers=format_rpc_servers(servers)), check,
                                  gpu_budgets=gpu_budgets, gpu_layers=gpu_layers)  # (answers kept: no new probe)
    why = one_error(failed)
    if _fits(plan, strategy):
        where = (f"on this machine and {', '.join(s.endpoint for s in servers)}" if plan.n_gpu_layers and servers
                 else "on this machine alone")
        left_out = ", ".join(e.message for e in failed)
        warn(f"{'an RPC server' if len(failed) == 1 else 'RPC servers'} left out ({left_out}): the model fits "
             f"{where} and loads there")
        return plan, settings
    arithmetic = plan.refusal() if plan.devices else (
        f"it needs {format_bytes(plan.cpu.total_bytes)} here, budget {format_bytes(strategy.memory_budget_bytes)}")
    raise RpcServerUnavailable(f"{why.message}, and the model does not fit without it: {arithmetic}", hint=why.hint)


# An encoder's contexts decoding side by side. On a CPU, one a thread: measured on 2 cores
# (all-MiniLM-L6-v2 F16, 700-character chunks), 2 contexts of 1 thread 35.5 chunks/s against
# 24.5-30.5 for 1 context of 2 threads (llama.cpp's threads meet at a barrier after every op of
# a small model). On a GPU each context has its own stream: measured on an H200 (4,000 chunks,
# 2 sequences a decode) 1 → 942 chunks/s, 4 → 1,633, 6 → 2,095, 8 → 2,142-2,472, 12 → 2,152-2,254,
# 16 → 1,606; each further context holds about 120 MiB of VRAM there.
ENCODER_CPU_CONTEXTS_MAX = 8


def pool_extra_bytes(plan, contexts: int) -> tuple[int, int]:
    """(RAM, VRAM) that an encoder's contexts beyond the first hold: each its compute and output buffers
    in RAM (on a GPU, the host side of them), and on a GPU its own compute buffer, CUDA streams, cuBLAS
    handles and ggml-cuda memory pool."""
    ram = (contexts - 1) * plan.cpu.compute_bytes
    if not plan.n_gpu_layers:
        return ram, 0
    return ram, (contexts - 1) * (plan.gpus[0].compute_bytes + CUDA_CONTEXT_EXTRA_BYTES)


def encoder_contexts(plan, threads: int) -> int:
    """How many contexts an encoder's pool has, from where it runs and the GPU budget."""
    if not plan.n_gpu_layers:
        return max(1, min(threads, ENCODER_CPU_CONTEXTS_MAX))
    from .engine.settings import encoder_gpu_tuning

    g, budget = plan.gpus[0], plan.gpu_budgets[0]
    room = (budget - g.total_bytes) // pool_extra_bytes(plan, 2)[1]
    return max(1, min(encoder_gpu_tuning()[0], 1 + room))




def exact_plan(plan, spec, header, *, projector=None):
    """``plan`` with llama.cpp's own figures for this machine's devices: its dry run of ``spec`` (the
    very load the plan makes) gives each device's compute and output buffers; the weights and the KV
    cache, which the header fixes, stay the formula's (they are llama.cpp's to the byte). A split over
    RPC servers, or a dry run that gives nothing, keeps the formula's plan."""
    from dataclasses import replace

    from . import engine
    from .estimate import estimate_memory

    if plan.devices or spec.rpc_servers:
        return plan
    try:
        dry = engine.dry_run(spec, engine.header_digest(spec.path, header.data_offset))
    except engine.DryRunFailed as exc:
        from ._debug import debug_enabled

        if debug_enabled():
            import sys

            print(f"orion: {exc}; the estimate is the formula's", file=sys.stderr)
        return plan
    cpu = estimate_memory(header, spec.n_ctx, spec.settings, projector=projector, n_gpu_layers=plan.n_gpu_layers,
                          parallel=spec.parallel, dry=dry)
    gpus = tuple(replace(g, compute_bytes=dry.compute[f"CUDA{i}"], source="llama.cpp dry run")
                 if f"CUDA{i}" in dry.compute else g for i, g in enumerate(plan.gpus))
    return replace(plan, cpu=cpu, gpus=gpus)


def machine_plan(header, n_ctx: int, strategy: Strategy, *, path=None, header_bytes: bytes | None = None,
                 projector=None):
    """(plan, settings) of loading a model on this machine as ``orion run`` would, for the commands that
    estimate without loading (inspect, fetch): the offload plan, with llama.cpp's dry run of that load
    where it can run (a local file, or ``header_bytes``: a remote file's header, dry-run from a sparse
    copy: nothing is downloaded). None before the engine check has run on this machine (``orion
    profile`` runs it): the caller keeps the formula's CPU estimate."""
    from . import engine
    from .estimate import ENCODER_ARCHITECTURES

    check = engine.machine_check()
    if check is None:
        return None
    embedding = header.architecture in ENCODER_ARCHITECTURES
    plan, settings = offload_plan(header, n_ctx, strategy, check, embedding=embedding, projector=projector)
    if os.environ.get("ORION_DRY_RUN", "1") == "0":
        return plan, settings
    copy = None
    if path is None and header_bytes is not None and header.parts == 1 and header.file_size:
        copy = path = engine.dryrun.cached_sparse_copy(header_bytes, header.file_size)
    if path is None:
        return plan, settings
    spec = engine.LoadSpec(path, n_ctx, strategy.threads, plan.n_gpu_layers, embedding=embedding, settings=settings,
                           tensor_split=plan.tensor_split)
    try:
        return exact_plan(plan, spec, header, projector=projector), settings
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)  # its figures are cached; the copy has done its work
