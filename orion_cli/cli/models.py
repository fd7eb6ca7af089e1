"""``orion import``, ``orion list``, ``orion rm`` and ``orion inspect``: the models on this machine."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import CtxOpt, KvTypeOpt, RpcOpt, json_option, model_names
from ._output import escape, examples, out, styled

IMPORT_EXAMPLES = examples(
    ("orion import ~/models/mistral.Q4_K_M.gguf", "register a GGUF under its file name"),
    ("orion import model.gguf --name mistral", "under a name of your choice"),
    ("orion import llava.gguf --projector mmproj.gguf", "a vision model and its projector"),
)
LIST_EXAMPLES = examples(("orion list", "models here, their estimate and whether they fit"),
                         ("orion list --json", "the same for scripts"))
RM_EXAMPLES = examples(("orion rm mistral", "delete a fetched model's files from the HF cache"),
                       ("orion rm my-import", "forget an imported model (its file stays)"))
INSPECT_EXAMPLES = examples(
    ("orion inspect model.gguf", "header summary and memory estimate of a file"),
    ("orion inspect gemma3-270m --ctx 2048", "a fetched or imported model"),
    ("orion inspect org/repo/file.gguf", "a file on the Hub, without downloading it"),
    ("orion inspect mistral", "every GGUF of a catalog model's repo"),
)


@json_option("Print the registered entry as JSON.")
def import_(
    path: Annotated[str, typer.Argument(help="A local .gguf file (the first part of a split file), or a BERT encoder folder.")],
    name: Annotated[Optional[str], typer.Option(help="Register under this name (default: the file name).", metavar="NAME")] = None,
    projector: Annotated[Optional[Path], typer.Option(help="The vision projector (mmproj) GGUF that goes with it.", metavar="PATH")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model already registered under NAME.")] = False,
) -> None:
    """Register a local GGUF under a short name, for models got elsewhere and offline machines.

    The file stays where it is: orion reads it in place, and 'orion rm' never deletes it.
    """
    from dataclasses import asdict

    from .._text import clip
    from ..errors import InvalidValue, NotFound
    from ..models import PATH_HINT, import_encoder_folder, import_gguf, on_disk, user_path
    from ..strategy import load_strategy

    if not path.strip():  # Path("") is the current folder
        raise InvalidValue("an empty path was given", hint="give the .gguf file or the encoder folder to import")
    path = user_path(path, hint=PATH_HINT).absolute()  # ~user for a user not here: NotFound
    if not on_disk(path):  # a name too long for a file names none
        raise NotFound(f"no such file or folder: {clip(path, 200)}", hint="check the path")
    if projector is not None:
        projector = user_path(str(projector), hint=PATH_HINT).absolute()
        if not on_disk(projector):
            raise NotFound(f"no such file: {clip(projector, 200)}", hint="check the path given to --projector")
    if path.is_dir() and (path / "config.json").exists():
        model = import_encoder_folder(path, name=name, replace=force)
        out.result({"model": asdict(model)},
                   lambda: f"Imported [bold]{escape(model.name)}[/]: BERT encoder (safetensors), {escape(path)}; "
                           f"converted to GGUF on first use by 'orion embed'")
        return
    model, header = import_gguf(path, name=name, replace=force, projector=projector)
    strategy = load_strategy()

    def human() -> None:
        from ..engine import machine_settings
        from ..estimate import estimate_memory
        from ..units import format_bytes

        est = estimate_memory(header, strategy.n_ctx, machine_settings(kv_type=strategy.kv_type))
        fits = "fits" if est.total_bytes <= strategy.memory_budget_bytes else "does NOT fit"
        out.text(f"Imported [bold]{escape(model.name)}[/]: {escape(header.architecture)} {escape(header.file_type)}, "
                 f"{format_bytes(model.size_bytes)}, {escape(path)}")
        out.text(f"  memory at n_ctx {strategy.n_ctx}: {format_bytes(est.total_bytes)}, {fits} the budget of "
                 f"{format_bytes(strategy.memory_budget_bytes)}")

    out.result({"model": asdict(model), "header": header.summary()}, human)


@json_option("Print the models as JSON.")
def list_() -> None:
    """List the models on this machine: type, size, memory estimate at the strategy's context, and fit."""
    from dataclasses import asdict

    from ..engine import machine_settings
    from ..models import Registry
    from ..strategy import load_strategy

    strategy = load_strategy()
    budget = strategy.memory_budget_bytes
    settings = machine_settings(kv_type=strategy.kv_type)
    from ..quality import QualityBook, quality_of
    from ..setting_values import format_kv_type

    book, kv = QualityBook(), format_kv_type(strategy.kv_type)
    rows = []
    for m in Registry().all().values():
        est_bytes = None
        quality = None
        status = "ok"
        if not m.exists():
            status = "missing"
        elif m.path.endswith(".gguf"):
            from ..errors import OrionError
            from ..estimate import estimate_memory
            from ..gguf_header import read_local_header

            try:
                header = read_local_header(Path(m.path))
                est = estimate_memory(header, strategy.n_ctx, settings,
                                      projector=read_local_header(Path(m.projector_path)) if m.projector_path else None)
                est_bytes = est.total_bytes
                quality = quality_of(header, kv, book)
            except OrionError:
                status = "damaged"
        rows.append((m, est_bytes, status, quality))

    def human() -> str | None:
        from ..units import format_bytes

        if not rows:
            return "No models yet: 'orion fetch gemma3-270m', or 'orion import FILE.gguf'."
        cells = []  # text, whatever a hand-edited registry holds (styled: the verdicts only)
        for m, e, s, q in rows:
            fits = {"missing": styled("file missing", "red"), "damaged": styled("damaged", "red")}.get(
                s, styled("yes", "green") if e is not None and e <= budget else (styled("no", "red") if e else "-"))
            origin = m.repo if m.source == "hub" else m.path
            cells.append((m.name, m.kind, m.file_type, format_bytes(m.size_bytes), format_bytes(e) if e else "-", fits,
                          q.label if q is not None and m.kind != "encoder" else "-", origin or ""))
        right = {"justify": "right"}
        out.table(["name", "kind", "type", ("size", right), ("estimate", right), "fits", ("KLD", right), "from"], cells,
                  title=f"Estimates at n_ctx {strategy.n_ctx}, budget {format_bytes(budget)}")
        measured = [(m, q) for m, _, _, q in rows if q is not None and q.source == "measured"]
        out.text(f"[dim]KLD: mean KL divergence to the full-precision model at KV {escape(kv)}; measured here by "
                 "'orion eval --kld', or ~ typical for the type (llama.cpp's LLaMA 3 8B scoreboard)[/]")
        for m, q in measured:
            out.text(f"[dim]  {escape(m.name)}: {escape(q.record.describe())}[/]")
        return None

    out.result({"n_ctx": strategy.n_ctx, "budget_bytes": budget, "models": [
        asdict(m) | {"estimate_bytes": e, "fits": e is not None and e <= budget, "status": s,
                     "quality": q.to_dict() if q is not None else None}
        for m, e, s, q in rows]}, human)


@json_option("Print what was removed as JSON.")
def rm(
    name: Annotated[str, typer.Argument(help="A model name from 'orion list'.", autocompletion=model_names)],
) -> None:
    """Remove a model: a fetched one's files leave the HF cache; an imported one is only forgotten."""
    from ..models import remove_model
    from ..units import format_bytes

    model, freed = remove_model(name)
    imported = model.source == "import"
    out.result({"removed": name, "freed_bytes": freed, "kept_file": model.path if imported else None},
               lambda: f"Forgot [bold]{escape(name)}[/]; your file {escape(model.path)} is untouched." if imported else
               f"Removed [bold]{escape(name)}[/]: {format_bytes(freed)} freed from the Hugging Face cache.")


@json_option("Print the header summary and estimate as JSON.")
def inspect(
    model: Annotated[str, typer.Argument(help="A .gguf path, a model name, org/repo or org/repo/file.gguf.", autocompletion=model_names)],
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = None,
    rpc: RpcOpt = None,
) -> None:
    """Show a GGUF's header (architecture, type, layers, heads, context) and its memory estimate.

    Works on a local file, a fetched or imported model, or a file on the Hub,
    which is read with HTTP range requests, without downloading it.
    """
    from ..estimate import estimate_memory
    from ..gguf_header import read_local_header
    from ..models import on_disk, resolve
    from ..strategy import load_strategy

    strategy = load_strategy({"n_ctx": ctx, "kv_type": kv_type, "rpc_servers": rpc})
    ref = resolve(model)
    projector = None
    header_bytes = None
    if ref.path is not None:
        if not on_disk(ref.path):  # a name too long for a file names none
            from .._text import clip
            from ..errors import NotFound

            raise NotFound(f"no such file: {clip(ref.path, 200)}", hint="check the path")
        header = read_local_header(ref.path)
        if ref.local and ref.local.projector_path:
            projector = read_local_header(Path(ref.local.projector_path))
        where = str(ref.path)
    elif ref.filename:
        from .. import hub
        from ..gguf_files import split_group
        from ..gguf_header import merge_parts

        listing = hub.list_files(ref.repo)
        parts = split_group(ref.filename)
        missing = [p for p in parts if listing.get(p) is None]
        if missing:
            from ..errors import NotFound

            raise NotFound(f"no file {ref.repo}/{missing[0]} on the Hub", hint=f"run 'orion inspect {ref.repo}' to list its files")
        headers = [hub.read_remote_header(ref.repo, p, listing.get(p).size, listing.commit) for p in parts]
        header = merge_parts(headers) if len(headers) > 1 else headers[0]
        if len(parts) == 1 and not strategy.rpc_servers:  # llama.cpp's dry run reads a sparse copy of it
            from ..engine import machine_check
            from ..errors import OrionError

            try:
                if machine_check() is not None and os.environ.get("ORION_DRY_RUN", "1") != "0":
                    header_bytes = hub.read_remote_header_bytes(ref.repo, parts[0], listing.get(parts[0]).size,
                                                                header.data_offset, listing.commit)
            except OrionError:
                header_bytes = None  # the formula's figures then
            if header_bytes is not None and len(header_bytes) != header.data_offset:
                header_bytes = None
        where = f"{ref.repo}/{ref.filename} (read remotely)"
    else:
        return _inspect_repo(ref, strategy, ctx)

    from ..engine import machine_settings

    if strategy.rpc_servers:
        return _inspect_split(header, where, strategy)
    from ..placement import machine_plan

    planned = machine_plan(header, strategy.n_ctx, strategy, path=ref.path, header_bytes=header_bytes,
                           projector=projector)
    plan = planned[0] if planned else None
    est = plan.cpu if plan else estimate_memory(header, strategy.n_ctx, machine_settings(kv_type=strategy.kv_type),
                                               projector=projector)
    gpu_fits = plan.gpu_fits if plan else True
    fits = est.total_bytes <= strategy.memory_budget_bytes and gpu_fits

    from ..quality import quality_of
    from ..setting_values import format_kv_type

    quality = quality_of(header, format_kv_type(strategy.kv_type))

    def human() -> None:
        from ._render import estimate_table, header_table

        out.text(header_table(header.summary(), title=where))
        if quality.kld is not None:
            out.text(escape(f"quality: mean KLD {quality.label} at KV {format_kv_type(strategy.kv_type)}, "
                            + quality.to_dict()["note"]))
        template = _chat_template(header)
        if template is not None and template["fallback"]:
            out.text(escape(f"no chat template in the GGUF: a conversation is given in the {template['name']} format"))
        out.text()
        out.text(estimate_table(est, strategy.memory_budget_bytes))
        if plan is None:
            out.text("figures from the formula (llama.cpp's dry run is used once 'orion profile' has checked the engine)")
        elif est.source == "formula":
            out.text("figures from the formula (llama.cpp's dry run gave none for this file; --debug says why)")
        else:
            out.text("compute and outputs from llama.cpp's dry run of this load; weights and KV cache from the header")
        if plan and plan.n_gpu_layers:
            out.text(escape(f"offload: {plan.describe()}"))
            for i, g in enumerate(plan.gpus):
                out.text(escape(f"  GPU {i}: {g.arithmetic()} ({g.source})"))

    doc = {"source": where, "header": header.summary(), "chat_template": _chat_template(header),
           "estimate": est.to_dict(), "budget_bytes": strategy.memory_budget_bytes, "fits": fits,
           "quality": quality.to_dict()}
    if plan is not None:
        doc["offload"] = plan.to_dict()
    out.result(doc, human)


def _chat_template(header) -> dict | None:
    """The format a chat with the model is given in (``name`` as a response's x-orion-chat-template
    says it): the GGUF's own template, or the fallback chosen by its architecture; None for an encoder."""
    from ..estimate import ENCODER_ARCHITECTURES
    from ..messages import OWN_TEMPLATE, fallback_format

    if header.architecture in ENCODER_ARCHITECTURES:
        return None
    if header.get("tokenizer.chat_template"):
        return {"name": OWN_TEMPLATE, "fallback": False}
    return {"name": fallback_format(header.architecture), "fallback": True}


def _inspect_split(header, where: str, strategy) -> None:
    """inspect --rpc: the split across this machine and the RPC servers, each part's arithmetic."""
    from ..engine import machine_settings
    from ..placement import rpc_settings, split_plan
    from ..rpc import remote_devices_now
    from ..rpc_endpoints import parse_rpc_servers
    from ..units import format_bytes

    servers = remote_devices_now(parse_rpc_servers(strategy.rpc_servers), strategy.pressure_high)
    plan = split_plan(header, strategy.n_ctx, strategy, rpc_settings(machine_settings(kv_type=strategy.kv_type)),
                      remote=servers)
    fits = plan.local_fits and plan.gpu_fits

    def human() -> None:
        from ._render import estimate_table, header_table

        out.text(header_table(header.summary(), title=where))
        out.text()
        out.text(estimate_table(plan.cpu, strategy.memory_budget_bytes))
        out.text()
        for d in servers:  # how each budget was found (a CPU server's RAM is reported all free)
            out.text(f"[bold]{escape(d.name)}[/] budget: {escape(d.budget_how)}")
        out.text(f"[bold]split[/] at n_ctx {strategy.n_ctx} ({escape(plan.reason)}): {escape(plan.describe())}")
        for name, g, b in zip(plan.devices, plan.gpus, plan.gpu_budgets):
            if g.n_layers:
                out.text(escape(f"  {name}: {g.arithmetic()} (budget {format_bytes(b)})"))
        if not fits:
            out.text(f"[bold red]does not fit:[/] {escape(plan.refusal())}")

    out.result({"source": where, "header": header.summary(), "estimate": plan.cpu.to_dict(),
                "budget_bytes": strategy.memory_budget_bytes, "servers": [d.to_dict() for d in servers],
                "split": plan.to_dict(), "fits": fits}, human)


def _inspect_repo(ref, strategy, ctx) -> None:
    from ..fetch import plan_fetch
    from ._render import candidates_table, quality_note

    with out.status(f"Reading GGUF headers of {ref.repo}…"):
        plan = plan_fetch(ref, strategy, n_ctx=ctx)

    def human() -> None:
        out.text(candidates_table(plan))
        out.text(f"[dim]{escape(quality_note(plan))}[/]")

    out.result(plan.to_dict(), human)
