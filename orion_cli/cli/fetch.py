"""``orion fetch``: pick the quantization that fits this device and download it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import CtxOpt, KvTypeOpt, RpcOpt, json_option, model_names
from ._output import escape, examples, out

EXAMPLES = examples(
    ("orion fetch mistral", "the best file that fits the strategy (same as --auto)"),
    ("orion fetch mistral --dry-run", "every candidate with size, estimate, verdict"),
    ("orion fetch llava --quant q4", "a level (q4 q8 q16 q32) or a type (Q5_K_M)"),
    ("orion fetch mistral --max-kld 0.02 --dry-run", "choose by quality: mean KL divergence at most 0.02"),
    ("orion fetch org/repo --ctx 16384", "any Hub repo; estimate at a larger context"),
    ("orion fetch org/repo/file.gguf", "one file of a repo"),
    ("orion fetch big --auto --rpc box:50052", "the best file this machine and box hold together"),
)


@json_option("Print the plan and the result as JSON.")
def fetch(
    model: Annotated[str, typer.Argument(help="A catalog name (mistral, llava, bakllava, gemma3-270m, minilm), org/repo or org/repo/file.gguf.", autocompletion=model_names)],
    quant: Annotated[Optional[str], typer.Option(help="A level (q4, q8, q16, q32) or an exact GGUF type (Q5_K_M, Q8_0, F16).", metavar="Q")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Pick by the strategy: the best file at or below the tier's level that fits the budget and the disk (the default).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show every candidate with size, estimate and verdict; download nothing.")] = False,
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Register the model under this name.", metavar="NAME")] = None,
    rpc: RpcOpt = None,
    max_kld: Annotated[Optional[str], typer.Option("--max-kld", help="Choose by quality: of the files that fit, the lowest mean KL divergence to the full-precision model, and none above this bound. A file's KLD is what 'orion eval --kld' measured here, else the figure published for its type (llama.cpp's LLaMA 3 8B scoreboard). Replaces the tier's level. Default: the strategy's max_kld (ORION_MAX_KLD).", metavar="X")] = None,
) -> None:
    """Pick the quantization that fits this device and download it from the Hugging Face Hub.

    The quantization of every candidate is read from its GGUF header with HTTP
    range requests (nothing is downloaded), its memory is estimated at the
    strategy's context size, and the best file at or below the tier's level that
    fits the memory budget and the free disk is downloaded into the Hugging Face
    cache, resumably, and checked against the Hub's sha256. With --max-kld the
    choice is by quality within the budget: the file with the lowest mean KL
    divergence (measured here by 'orion eval --kld', else typical for its type)
    at or under the bound.
    """
    from ..errors import InvalidValue, Interrupted
    from ..fetch import fetch as do_fetch
    from ..fetch import plan_fetch, refuse
    from ..models import resolve, valid_name
    from ..strategy import load_strategy
    from ._output import err_console
    from ._render import candidates_table, estimate_table, quality_note

    if auto and quant:
        raise InvalidValue("--auto and --quant ask for different things", hint="give one of them")
    if quant:
        from ..fetch import normalise_quant

        normalise_quant(quant)  # a bad --quant is said before any network
    if name:
        valid_name(name)
    # (a bad --max-kld is said here, before any network)
    strategy = load_strategy({"n_ctx": ctx, "kv_type": kv_type, "rpc_servers": rpc, "max_kld": max_kld})
    ref = resolve(model)
    if ref.source == "path":
        from .._text import clip
        from ..errors import NotFound
        from ..models import on_disk

        if not on_disk(ref.path):  # a .gguf name that is no file here (one too long for a file included)
            raise NotFound(f"no such file: {clip(ref.path, 200)}",
                           hint="a .gguf name is a local file: give org/repo/file.gguf for one on the Hub")
        raise InvalidValue(f"{clip(model, 200)} is a local file, there is nothing to fetch",
                           hint=f"register it with 'orion import {clip(model, 200)}'")
    if ref.source == "registry" and ref.repo is None:
        raise InvalidValue(f"{model} was imported from {ref.path}, not fetched", hint="it is ready to use")
    if ref.format == "safetensors":
        if strategy.sources.get("max_kld") == "flag":
            raise InvalidValue(f"--max-kld chooses among a model's GGUF quantizations; {ref.repo} is an encoder "
                               "published as safetensors, fetched whole", hint="leave --max-kld out")
        return _fetch_snapshot(ref, name, dry_run)

    with out.status(f"Reading GGUF headers of {ref.repo}…"):
        plan = plan_fetch(ref, strategy, quant=quant, n_ctx=ctx)  # the bound: strategy.max_kld

    if dry_run:
        def human() -> None:
            out.text(candidates_table(plan))
            out.text(f"[dim]{escape(quality_note(plan))}[/]")
            if plan.chosen:
                out.text()
                out.text(estimate_table(plan.chosen.estimate, plan.budget_bytes))
                out.text(f"\nWould fetch [bold]{escape(plan.chosen.filename)}[/] ({escape(plan.chosen.file_type)}).")
            else:
                out.text(f"\nNothing fits: {escape(plan.hint)}")

        out.result({"dry_run": True, "plan": plan.to_dict()}, human)
        return
    if plan.chosen is None:
        raise refuse(plan)

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    # A bar for people at a terminal; nothing in logs and pipes.
    progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(binary_units=True),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=err_console(),
                        disable=not err_console().is_terminal)
    tasks: list = []

    def on_file(filename: str, total: int, have: int) -> None:
        label = filename if have == 0 else f"{filename} (resumed)"
        tasks.append(progress.add_task(label, total=total or None, completed=have))

    def on_bytes(n: int) -> None:
        progress.advance(tasks[-1], n)

    try:
        with progress:
            local = do_fetch(plan, name=name, on_file=on_file, on_bytes=on_bytes)
    except KeyboardInterrupt:
        raise Interrupted("download interrupted; what arrived is kept",
                          hint=f"run 'orion fetch {model}' again to resume") from None

    from dataclasses import asdict

    from ..units import format_bytes

    def human() -> None:
        out.text(f"Fetched [bold]{escape(local.name)}[/]: {escape(plan.chosen.filename)} ({escape(local.file_type)}, "
                 f"{format_bytes(local.size_bytes)}), sha256 verified")
        out.text(escape(f"  {local.path}"))
        if local.projector_path:
            out.text(escape(f"  projector {local.projector_path}"))
        out.text(escape(f"  memory at n_ctx {plan.n_ctx}: {plan.chosen.estimate.arithmetic()}"))
        q = plan.chosen.quality
        if q is not None and q.kld is not None:
            out.text(escape(f"  quality: mean KLD {q.label} ({q.note})"))

    out.result({"model": asdict(local), "estimate": plan.chosen.estimate.to_dict(), "plan": plan.to_dict()}, human)


def _fetch_snapshot(ref, name: str | None, dry_run: bool = False) -> None:
    """An encoder published as safetensors: its listed files, into the HF cache (with ``dry_run``:
    the files it would fetch, nothing downloaded)."""
    from dataclasses import asdict

    from ..snapshots import fetch_snapshot, snapshot_files

    if dry_run:
        with out.status(f"Listing {ref.repo}…"):
            files = snapshot_files(ref)
        from ..units import format_bytes

        total = sum(f.size or 0 for f in files)
        out.result({"dry_run": True, "repo": ref.repo, "files": [{"file": f.path, "size_bytes": f.size} for f in files],
                    "size_bytes": total},
                   lambda: "\n".join([f"{escape(ref.repo)}: an encoder published as safetensors, fetched whole:"]
                                     + [f"  {escape(f.path)}  {format_bytes(f.size or 0)}" for f in files]
                                     + [f"Would fetch {len(files)} files, {format_bytes(total)}."]))
        return

    with out.status(f"Downloading {ref.repo}…"):
        local = fetch_snapshot(ref, name=name)
    out.result({"model": asdict(local)},
               lambda: f"Fetched [bold]{escape(local.name)}[/] ({escape(ref.repo)}, safetensors) to {escape(local.path)}")
