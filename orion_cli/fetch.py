"""Choosing which file of a repo to fetch, and fetching it.

:func:`plan_fetch` reads the GGUF header of every candidate file with range
requests (nothing is downloaded), estimates its memory at the strategy's
context size, and picks one: the highest-quality file at or below the tier's
quantization level whose estimate fits the memory budget and whose size fits
the free disk. :func:`fetch` downloads the chosen file (and a vision model's
projector) into the Hugging Face cache and registers it under a short name.
"""

from __future__ import annotations

import os

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .errors import DoesNotFit, InvalidValue, NotFound
from .estimate import EngineSettings, Estimate, estimate_memory
from .gguf_files import group_gguf_files, split_group
from .gguf_header import GGUFHeader, merge_parts
from .models import LocalModel, ModelRef, Registry
from .offload import OffloadPlan, plan_offload
from .quality import Quality
from .quant_types import ALIASES, LEVEL_PREFERRED, LEVEL_TYPE, QUALITY, quality_rank
from ._fs import now_iso
from .strategy import Strategy
from .units import format_bytes

def expected_tok_s(bench: dict, size_bytes: int, gpu_share: float = 0.0) -> float | None:
    """Generation speed expected for a file of ``size_bytes``, scaled from a measured model.

    Generation reads every weight once per token, so it is bound by memory bandwidth:
    tokens/s scales with 1 / model size (a rough guide, shown as ~). With ``gpu_share`` of the
    weights on the GPU, a token takes the CPU's time for the rest plus the GPU's for that share,
    each from the measured model on it (``orion profile --bench`` measures it on the GPU too);
    None where that was not measured.
    """
    if not bench or not bench.get("gen_tok_s") or not bench.get("size_bytes") or not size_bytes:
        return None
    cpu_rate = bench["gen_tok_s"] * bench["size_bytes"]  # weight bytes read per second
    if gpu_share <= 0:
        return cpu_rate / size_bytes
    gpu = bench.get("gpu") or {}
    if not gpu.get("gen_tok_s"):
        return None
    gpu_rate = gpu["gen_tok_s"] * bench["size_bytes"]
    return 1.0 / (size_bytes * (1 - gpu_share) / cpu_rate + size_bytes * gpu_share / gpu_rate)


@dataclass(frozen=True)
class Candidate:
    filename: str  # the file, or the first part of a split file
    parts: tuple[str, ...]
    size_bytes: int
    header: GGUFHeader
    estimate: Estimate  # what stays in RAM (all of it without a GPU)
    verdict: str = ""
    fits: bool = False
    disk_bytes: int = 0  # what fetching it still writes to disk (less what the cache holds), projector included
    offload: OffloadPlan | None = None  # with a GPU: where its layers go
    quality: Quality | None = None  # its mean KLD: measured here (orion eval --kld), typical for its type, or unknown

    @property
    def file_type(self) -> str:
        return self.header.file_type

    @property
    def gpu_share(self) -> float:
        """The share of its weights on the GPU."""
        if self.offload is None or not self.header.tensor_bytes:
            return 0.0
        return min(1.0, sum(g.weights_bytes for g in self.offload.gpus) / self.header.tensor_bytes)

    @property
    def gpu_layers(self) -> str:
        return f"{self.offload.n_gpu_layers}/{self.offload.n_total}" if self.offload is not None else ""


@dataclass(frozen=True)
class FetchPlan:
    ref: ModelRef
    repo: str
    commit: str | None
    n_ctx: int
    budget_bytes: int
    free_disk_bytes: int
    level: str | None
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    projector: str | None = None
    projector_bytes: int = 0
    hint: str = ""
    listing: object = field(default=None, compare=False, repr=False)  # hub.RepoListing
    bench: dict = field(default_factory=dict)  # the strategy's measured speed, for expected tok/s
    gpu_budgets: tuple[int, ...] = ()  # each GPU's budget (none: no GPU offload)
    max_kld: float | None = None  # the quality bound (--max-kld): a file above it is not chosen
    max_kld_source: str = ""  # where the bound came from: "flag", "env ORION_MAX_KLD", "file", "tier"
    quant: str | None = None  # what --quant asked for (a level or a type), normalised

    def to_dict(self) -> dict:
        return {
            "repo": self.repo,
            "commit": self.commit,
            "n_ctx": self.n_ctx,
            "budget_bytes": self.budget_bytes,
            "gpu_budgets": list(self.gpu_budgets),
            "free_disk_bytes": self.free_disk_bytes,
            "level": self.level,
            "max_kld": self.max_kld,
            "max_kld_source": self.max_kld_source,
            "chosen": self.chosen.filename if self.chosen else None,
            "projector": self.projector,
            "candidates": [
                {
                    "file": c.filename, "parts": list(c.parts), "file_type": c.file_type, "size_bytes": c.size_bytes,
                    "disk_bytes": c.disk_bytes, "estimate_bytes": c.estimate.total_bytes, "estimate": c.estimate.to_dict(),
                    "fits": c.fits, "verdict": c.verdict,
                    "expected_tok_s": None if c.offload is not None and c.offload.devices else
                    expected_tok_s(self.bench, c.size_bytes, c.gpu_share),
                    "offload": c.offload.to_dict() if c.offload is not None else None,
                    "quality": c.quality.to_dict() if c.quality is not None else None,
                }
                for c in self.candidates
            ],
            "hint": self.hint,
        }


def normalise_quant(quant: str) -> str:
    q = quant.strip()
    if q.lower() in LEVEL_TYPE:
        return q.lower()
    upper = q.upper()
    if upper in QUALITY or upper in ALIASES:
        return ALIASES.get(upper, upper)
    raise InvalidValue(f"--quant {quant!r} is not a quantization",
                       hint="use a level (q4, q8, q16, q32) or a GGUF type such as Q4_K_M, Q5_K_M, Q8_0, F16")


def plan_fetch(
    ref: ModelRef,
    strategy: Strategy,
    *,
    quant: str | None = None,
    n_ctx: int | None = None,
    free_disk_bytes: int | None = None,
    read_header: Callable[[str, str, int | None], GGUFHeader] | None = None,
    listing=None,
    settings: EngineSettings | None = None,
    gpu_budgets: Sequence[int] | None = None,
    on_disk: Callable[[str], int] | None = None,
    remote=None,
    max_kld: float | None = None,
    quality_book=None,
) -> FetchPlan:
    """Every candidate file of the model's repo with its estimate and verdict, and the choice.

    ``settings``: the engine settings the estimates assume (default: this machine's, with the
    strategy's KV cache types).
    ``gpu_budgets``: each GPU's budget (default: this machine's GPUs, where the engine can offload).
    With a GPU, each candidate gets an offload plan; its RAM part is what the budget must hold, and
    a file that fits wholly on the GPU is preferred to a larger one that spills onto the CPU.
    ``on_disk(name)``: the bytes of a file the cache already holds (cached, or a partial download
    to resume); only the rest must fit the free disk. With RPC servers in the strategy (``remote``:
    their devices, default: asked now), each candidate gets a split plan instead: its part here is
    what the budget must hold, and the servers' parts must fit theirs.

    ``max_kld``: the quality bound (default: the strategy's ``max_kld``). Each candidate's mean KL divergence is its record here (``orion
    eval --kld``, at the strategy's KV type) or, unmeasured, the figure published for its type
    (:mod:`.quality`); a file above the bound, or with neither, is not chosen. The bound takes the place of
    the tier's level (unless --quant is given too): of the files that fit and are under it, the one with
    the lowest KLD is chosen."""
    from . import hub
    from .engine import machine_settings

    settings = settings or machine_settings(kv_type=strategy.kv_type)
    if gpu_budgets is None:
        gpu_budgets = _machine_gpu_budgets(strategy)
    gpu_budgets = tuple(gpu_budgets) if strategy.n_gpu_layers != 0 else ()
    gpu_settings = replace(settings, flash_attn=True)

    if ref.repo is None:
        raise NotFound(f"{ref.name} is a local file, there is nothing to fetch", hint="use it directly")
    n_ctx = n_ctx or strategy.n_ctx
    listing = listing or hub.list_files(ref.repo)
    read_header_default = read_header is None  # a caller's own headers (tests) have no bytes to dry-run
    read_header = read_header or (lambda repo, name, size: hub.read_remote_header(repo, name, size, listing.commit))
    on_disk = on_disk or (lambda name: hub.bytes_on_disk(ref.repo, listing.get(name), listing.commit))
    if free_disk_bytes is None:
        import shutil

        from .paths import existing_parent, hf_cache_dir

        free_disk_bytes = shutil.disk_usage(existing_parent(hf_cache_dir())).free

    names = [f.path for f in listing.files]
    if ref.filename:
        if ref.filename not in names:
            raise NotFound(f"no file {ref.filename} in {ref.repo}", hint=f"run 'orion inspect {ref.repo}' to list its files")
        groups = [split_group(ref.filename)]
    else:
        groups = group_gguf_files(names, ref.pattern)
    if not groups:
        raise NotFound(f"{ref.repo} has no GGUF model file",
                       hint="orion runs GGUF models; look for a '-GGUF' repo of the same model")

    projector = ref.projector if ref.projector in names else None
    if ref.projector and projector is None:
        raise NotFound(f"{ref.repo} has no projector file {ref.projector}", hint="the repo changed: report it")
    projector_header = read_header(ref.repo, projector, listing.get(projector).size) if projector else None

    if strategy.rpc_servers and remote is None:
        from .rpc import remote_devices_now
        from .rpc_endpoints import parse_rpc_servers

        remote = remote_devices_now(parse_rpc_servers(strategy.rpc_servers), strategy.pressure_high)

    def build(group: tuple[str, ...]) -> Candidate:
        headers = [read_header(ref.repo, n, listing.get(n).size) for n in group]
        header = merge_parts(headers) if len(headers) > 1 else headers[0]
        size = sum(listing.get(n).size or 0 for n in group)
        if remote:  # split across this machine and the RPC servers
            from .placement import rpc_settings, split_plan

            plan = split_plan(header, n_ctx, strategy, rpc_settings(gpu_settings if gpu_budgets else settings),
                              gpu_budgets=gpu_budgets, remote=remote)
            return Candidate(group[0], group, size, header, plan.cpu, offload=plan)
        if gpu_budgets:
            plan = plan_offload(header, n_ctx, gpu_settings, gpu_budgets, strategy.n_gpu_layers,
                                projector=projector_header)
            if plan.n_gpu_layers:
                return Candidate(group[0], group, size, header, plan.cpu, offload=plan)
        est = estimate_memory(header, n_ctx, settings, projector=projector_header)
        return Candidate(group[0], group, size, header, est)

    with ThreadPoolExecutor(max_workers=4) as pool:
        candidates = list(pool.map(build, groups))
    candidates.sort(key=lambda c: (quality_rank(c.file_type), -c.size_bytes))
    bound_source = "argument" if max_kld is not None else ""
    if max_kld is None:
        max_kld = getattr(strategy, "max_kld", None)
        bound_source = strategy.sources.get("max_kld") or "" if max_kld is not None else ""
    if max_kld is not None and not (max_kld >= 0 and max_kld == max_kld):
        raise InvalidValue(f"--max-kld {max_kld} is not a KL divergence", hint="give a mean KLD ≥ 0, such as 0.05")
    from .quality import QualityBook, kv_type_for, quality_of
    from .setting_values import format_kv_type

    book = quality_book or QualityBook()
    kv = format_kv_type((settings.type_k, settings.type_v))  # eval --kld --kv-type records K and V alike
    bounded = replace(strategy, max_kld=max_kld) if hasattr(strategy, "max_kld") else strategy

    def quality(c: Candidate):
        # at the KV type its load would take (a tier's type measured above the bound gives way: kv_type_for)
        own = format_kv_type(kv_type_for(c.header, bounded, book)[0]) if max_kld is not None else kv
        return quality_of(c.header, own, book)

    candidates = [replace(c, quality=quality(c)) for c in candidates]

    wanted = normalise_quant(quant) if quant else None
    if wanted is None:
        level = None if max_kld is not None else strategy.quantization
    else:
        level = wanted if wanted in LEVEL_TYPE else None
    budget = strategy.memory_budget_bytes
    projector_size = max(0, (listing.get(projector).size or 0) - on_disk(projector)) if projector else 0

    def judge(c: Candidate) -> Candidate:
        disk_needed = max(0, c.size_bytes - sum(on_disk(n) for n in c.parts)) + projector_size
        reasons = []
        if wanted and wanted not in LEVEL_TYPE:
            if c.file_type.upper() != wanted:
                reasons.append(f"not {wanted}")
        elif wanted in LEVEL_TYPE:
            if c.file_type.upper() not in LEVEL_PREFERRED[wanted]:
                reasons.append(f"not {'/'.join(LEVEL_PREFERRED[wanted])}")
        elif level is not None and quality_rank(c.file_type) < quality_rank(LEVEL_TYPE[level]):
            reasons.append(f"above the tier's level {level}")
        if max_kld is not None:
            q = c.quality
            if q is None or q.kld is None:
                reasons.append(f"KLD unknown (not measured here; no published figure for {c.file_type})")
            elif q.kld > max_kld:
                reasons.append(f"KLD {q.label} above max_kld {max_kld:g}")
        if c.estimate.total_bytes > budget:
            reasons.append(f"needs {format_bytes(c.estimate.total_bytes)}, budget {format_bytes(budget)}")
        if c.offload is not None and c.offload.devices and not c.offload.gpu_fits:
            reasons.append(f"the RPC servers' part does not fit ({c.offload.refusal()})")
        if disk_needed > free_disk_bytes:
            reasons.append(f"needs {format_bytes(disk_needed)} of disk, {format_bytes(free_disk_bytes)} free")
        return replace(c, verdict="; ".join(reasons) or "fits", fits=not reasons, disk_bytes=disk_needed)

    judged = [judge(c) for c in candidates]
    dry_runs = read_header_default and not remote and os.environ.get("ORION_DRY_RUN", "1") != "0"
    while True:
        chosen = _choose(judged, wanted, max_kld)
        if chosen is None or not dry_runs or chosen.estimate.source != "formula":
            break
        # the choice's figures from llama.cpp's dry run of its header (a sparse copy: nothing downloaded);
        # if they do not fit after all, the next candidate is judged the same way
        exact = judge(_with_dry_run(chosen, ref, listing, n_ctx, strategy, settings, gpu_settings, projector_header))
        judged = [exact if c is chosen else c for c in judged]
        if exact.estimate.source == "formula" or exact.fits:
            chosen = exact if exact.fits else _choose(judged, wanted, max_kld)
            break
    if chosen:
        judged = [replace(c, verdict="chosen") if c is chosen else c for c in judged]

    hint = "" if chosen else _what_would_fit(judged, wanted, level, budget, free_disk_bytes, n_ctx, projector_header,
                                             settings, max_kld)
    return FetchPlan(ref, ref.repo, listing.commit, n_ctx, budget, free_disk_bytes, level, tuple(judged),
                     next((c for c in judged if c.verdict == "chosen"), None), projector,
                     projector_size, hint, listing, strategy.bench, gpu_budgets, max_kld, bound_source, wanted)


def _choose(judged: list[Candidate], wanted, max_kld: float | None = None) -> Candidate | None:
    if max_kld is not None and wanted is None:
        # under a quality bound: of the files that fit (wholly on the GPU first), the lowest KLD
        fits = [c for c in judged if c.fits]
        full = [c for c in fits if c.offload is not None and c.offload.full]
        pool = full or fits
        return min(pool, key=lambda c: c.quality.kld) if pool else None
    if wanted in LEVEL_TYPE:
        # --quant q4: the level's preferred type in order (Q4_K_M, else Q4_0)
        for t in LEVEL_PREFERRED[wanted]:
            found = next((c for c in judged if c.file_type.upper() == t and c.fits), None)
            if found:
                return found
        return None
    # with a GPU, the best file that fits wholly on it, else the best that fits at all
    return next((c for c in judged if c.fits and c.offload is not None and c.offload.full), None) \
        or next((c for c in judged if c.fits), None)


def _with_dry_run(c: Candidate, ref, listing, n_ctx: int, strategy: Strategy, settings: EngineSettings,
                  gpu_settings: EngineSettings, projector_header) -> Candidate:
    """``c`` with llama.cpp's figures for the load it would get here (its RAM part, and the GPUs'),
    dry-run from a sparse copy of its header; unchanged for a split file, before the engine check has
    run, or when the dry run gives nothing."""
    from . import engine, hub
    from .placement import exact_plan

    from .errors import OrionError
    from .estimate import ENCODER_ARCHITECTURES

    if len(c.parts) != 1 or engine.machine_check() is None or not c.header.file_size:
        return c
    try:
        head = hub.read_remote_header_bytes(ref.repo, c.parts[0], listing.get(c.parts[0]).size, c.header.data_offset,
                                            listing.commit)
    except OrionError:  # the Hub answered the header once and not now: the formula's figures stand
        return c
    path = engine.dryrun.cached_sparse_copy(head, c.header.file_size) if len(head) == c.header.data_offset else None
    if path is None:
        return c
    plan = c.offload or plan_offload(c.header, n_ctx, settings, [], 0, projector=projector_header)
    spec = engine.LoadSpec(path, n_ctx, strategy.threads, plan.n_gpu_layers,
                           embedding=c.header.architecture in ENCODER_ARCHITECTURES,
                           settings=gpu_settings if c.offload is not None else settings, tensor_split=plan.tensor_split)
    try:
        plan = exact_plan(plan, spec, c.header, projector=projector_header)
    finally:
        path.unlink(missing_ok=True)  # its figures are cached; the copy has done its work
    return replace(c, estimate=plan.cpu, offload=plan if c.offload is not None else None)


def _machine_gpu_budgets(strategy: Strategy) -> list[int]:
    """This machine's GPU budgets, where the engine's cached verdict says it can offload."""
    from .placement import gpu_budgets_now

    budgets = gpu_budgets_now(strategy)  # empty, at no cost, without a GPU in the strategy
    if not budgets:
        return []
    from .engine import machine_check

    check = machine_check()
    return budgets if check is not None and check.gpu_offload else []


def _what_would_fit(cands: list[Candidate], wanted, level, budget, free_disk, n_ctx, projector_header,
                    settings: EngineSettings, max_kld: float | None = None) -> str:
    """A sentence saying what would fit when nothing does."""
    if max_kld is not None and not wanted:
        room = [c for c in cands if c.estimate.total_bytes <= budget and c.disk_bytes <= free_disk]
        known = [c for c in room if c.quality is not None and c.quality.kld is not None]
        if known:
            best = min(known, key=lambda c: c.quality.kld)
            typical = best.quality.source != "measured" or not best.quality.kv_measured
            return (f"the closest file that fits, {best.file_type} ({best.filename}), has KLD {best.quality.label}, "
                    f"above max_kld {max_kld:g}: raise the bound or choose a smaller model"
                    + (" (or measure it here: 'orion eval MODEL --kld' gives its own figure, which replaces the "
                       "typical one)" if typical else ""))
        if room:
            types = ", ".join(dict.fromkeys(c.file_type for c in room))
            return (f"no KLD is known for the files that fit ({types}): measure them with 'orion eval MODEL --kld', "
                    "or leave max_kld out")
    if wanted and wanted not in LEVEL_TYPE and not any(c.file_type.upper() == wanted for c in cands):
        have = ", ".join(dict.fromkeys(c.file_type for c in cands))
        return f"the repo has no {wanted} file; it has {have}"
    if wanted in LEVEL_TYPE and not any(c.file_type.upper() in LEVEL_PREFERRED[wanted] for c in cands):
        have = ", ".join(dict.fromkeys(c.file_type for c in cands))
        return f"the repo has no {'/'.join(LEVEL_PREFERRED[wanted])} file; it has {have}"
    smaller = [c for c in cands if c.estimate.total_bytes <= budget and c.disk_bytes <= free_disk]
    if max_kld is not None and wanted:
        asked = [c for c in smaller if (c.file_type.upper() == wanted if wanted not in LEVEL_TYPE
                                        else c.file_type.upper() in LEVEL_PREFERRED[wanted])]
        over = [c for c in asked if c.quality is not None and c.quality.kld is not None and c.quality.kld > max_kld]
        if over:
            c = over[0]
            return (f"{c.file_type} ({c.filename}) fits but has KLD {c.quality.label}, above max_kld {max_kld:g}: "
                    f"raise the bound, or leave --quant out to choose by the bound alone")
    if smaller:
        best = smaller[0]
        return (f"{best.file_type} ({best.filename}) fits: ask for it with --quant {best.file_type}"
                if wanted or level else f"{best.file_type} fits")
    smallest = min(cands, key=lambda c: c.estimate.total_bytes)
    if smallest.disk_bytes > free_disk:
        return f"even {smallest.file_type} needs {format_bytes(smallest.disk_bytes)} of disk, {format_bytes(free_disk)} is free"
    ctx = n_ctx
    while ctx > 256:
        ctx //= 2
        est = estimate_memory(smallest.header, ctx, settings, projector=projector_header)
        if est.total_bytes <= budget:
            return (f"{smallest.file_type} fits with --ctx {ctx} ({format_bytes(est.total_bytes)}); "
                    f"at --ctx {n_ctx} it needs {format_bytes(smallest.estimate.total_bytes)}")
    return (f"the smallest file, {smallest.file_type}, needs {format_bytes(smallest.estimate.total_bytes)} and the budget "
            f"is {format_bytes(budget)}: choose a smaller model, or raise the budget (ORION_MEMORY_BUDGET)")


def refuse(plan: FetchPlan) -> DoesNotFit | NotFound:
    """The error for a plan with nothing chosen."""
    if plan.hint.startswith("the repo has no"):
        return NotFound(f"{plan.repo}: nothing to fetch", hint=plan.hint)
    what = (f"level {plan.level}" if plan.level else f"KLD ≤ {plan.max_kld:g}" if plan.max_kld is not None
            else "the requested type")
    return DoesNotFit(
        f"no file of {plan.repo} fits ({what}, n_ctx {plan.n_ctx}, budget {format_bytes(plan.budget_bytes)})",
        hint=plan.hint,
    )


def fetch(
    plan: FetchPlan,
    *,
    name: str | None = None,
    registry: Registry | None = None,
    on_file: Callable[[str, int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> LocalModel:
    """Download the plan's choice (and projector) and register it; returns the registry entry."""
    from . import hub

    if plan.chosen is None:
        raise refuse(plan)
    listing = plan.listing

    def download(filename: str) -> Path:
        def started(total: int, have: int) -> None:
            if on_file:
                on_file(filename, total, have)

        return hub.download(plan.repo, listing.get(filename), on_start=started, on_bytes=on_bytes)

    paths = [download(part) for part in plan.chosen.parts]
    projector_path = str(download(plan.projector)) if plan.projector else None
    model = LocalModel(
        name=name or plan.ref.name,
        kind=plan.ref.kind,
        path=str(paths[0]),
        source="hub",
        file_type=plan.chosen.file_type,
        size_bytes=plan.chosen.size_bytes,
        repo=plan.repo,
        filename=plan.chosen.filename,
        projector_path=projector_path,
        projector_filename=plan.projector,
        sha256=listing.get(plan.chosen.parts[0]).sha256,
        added=now_iso(),
    )
    (registry or Registry()).add(model)
    return model
