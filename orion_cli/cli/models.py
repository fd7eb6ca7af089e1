"""``orion import``, ``orion list``, ``orion rm`` and ``orion inspect``: the models on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .completion import model_names

from ._output import examples

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


def import_(
    path: Annotated[str, typer.Argument(help="A local .gguf file (the first part of a split file), or a BERT encoder folder.")],
    name: Annotated[Optional[str], typer.Option(help="Register under this name (default: the file name).", metavar="NAME")] = None,
    projector: Annotated[Optional[Path], typer.Option(help="The vision projector (mmproj) GGUF that goes with it.", metavar="PATH")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model already registered under NAME.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the registered entry as JSON.")] = False,
) -> None:
    """Register a local GGUF under a short name, for models got elsewhere and offline machines.

    The file stays where it is: orion reads it in place, and 'orion rm' never deletes it.
    """
    from ..gguf_header import read_local_header
    from ..models import LocalModel, Registry, default_name_for, valid_name
    from .._fs import now_iso
    from ..strategy import load_strategy

    from ..errors import InvalidValue

    if not path.strip():  # Path("") is the current folder
        raise InvalidValue("an empty path was given", hint="give the .gguf file or the encoder folder to import")
    path = Path(path).expanduser().absolute()
    if path.is_dir() and (path / "config.json").exists():
        return _import_folder(path, name, json_output, force)
    header = read_local_header(path)  # a missing, non-GGUF or damaged file fails here, clearly
    proj_path = None
    if projector is not None:
        projector = projector.expanduser().absolute()
        read_local_header(projector)
        proj_path = str(projector)
    name = valid_name(name or default_name_for("local", path.name))
    from ..estimate import ENCODER_ARCHITECTURES

    kind = "vision" if proj_path else ("encoder" if header.architecture in ENCODER_ARCHITECTURES else "llm")
    size = header.file_size or path.stat().st_size
    model = LocalModel(name=name, kind=kind, path=str(path), source="import", file_type=header.file_type,
                       size_bytes=size, projector_path=proj_path, added=now_iso())
    Registry().add(model, replace=force)
    strategy = load_strategy()
    if json_output:
        from dataclasses import asdict

        from ._output import print_json

        print_json({"model": asdict(model), "header": header.summary()})
        return
    from ..engine import machine_settings
    from ..estimate import estimate_memory
    from ..units import format_bytes
    from ._output import console

    est = estimate_memory(header, strategy.n_ctx, machine_settings())
    fits = "fits" if est.total_bytes <= strategy.memory_budget_bytes else "does NOT fit"
    console().print(f"Imported [bold]{name}[/]: {header.architecture} {header.file_type}, {format_bytes(size)}, {path}")
    console().print(f"  memory at n_ctx {strategy.n_ctx}: {format_bytes(est.total_bytes)}, {fits} the budget of "
                    f"{format_bytes(strategy.memory_budget_bytes)}")


def _import_folder(folder: Path, name: str | None, json_output: bool, force: bool) -> None:
    """A Hugging Face encoder folder: registered as is, converted to GGUF on first use (orion embed)."""
    from ..convert import _read_json
    from ..errors import InvalidValue
    from ..models import LocalModel, Registry, default_name_for, valid_name
    from .._fs import now_iso

    config = _read_json(folder / "config.json")
    if config.get("model_type") != "bert" or not (folder / "model.safetensors").exists():
        raise InvalidValue(f"{folder} is not a BERT encoder with model.safetensors",
                           hint="orion imports GGUF files and BERT encoder folders")
    name = valid_name(name or default_name_for("local", folder.name))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    model = LocalModel(name=name, kind="encoder", path=str(folder), source="import", file_type="safetensors",
                       size_bytes=size, added=now_iso())
    Registry().add(model, replace=force)
    if json_output:
        from dataclasses import asdict

        from ._output import print_json

        print_json({"model": asdict(model)})
        return
    from ._output import console

    console().print(f"Imported [bold]{name}[/]: BERT encoder (safetensors), {folder}; "
                    f"converted to GGUF on first use by 'orion embed'")


def list_(
    json_output: Annotated[bool, typer.Option("--json", help="Print the models as JSON.")] = False,
) -> None:
    """List the models on this machine: type, size, memory estimate at the strategy's context, and fit."""
    from ..models import Registry
    from ..strategy import load_strategy

    strategy = load_strategy()
    rows = []
    from ..engine import machine_settings

    settings = machine_settings()
    for m in Registry().all().values():
        est_bytes = None
        status = "ok"
        if not m.exists():
            status = "missing"
        elif m.path.endswith(".gguf"):
            from ..errors import OrionError
            from ..estimate import estimate_memory
            from ..gguf_header import read_local_header

            try:
                est = estimate_memory(read_local_header(Path(m.path)), strategy.n_ctx, settings,
                                      projector=read_local_header(Path(m.projector_path)) if m.projector_path else None)
                est_bytes = est.total_bytes
            except OrionError:
                status = "damaged"
        rows.append((m, est_bytes, status))
    if json_output:
        from dataclasses import asdict

        from ._output import print_json

        print_json({"n_ctx": strategy.n_ctx, "budget_bytes": strategy.memory_budget_bytes, "models": [
            asdict(m) | {"estimate_bytes": e, "fits": e is not None and e <= strategy.memory_budget_bytes, "status": s}
            for m, e, s in rows]})
        return
    from rich.markup import escape
    from rich.table import Table

    from ..units import format_bytes
    from ._output import console

    if not rows:
        console().print("No models yet: 'orion fetch gemma3-270m', or 'orion import FILE.gguf'.")
        return
    t = Table(box=None, pad_edge=False, title=f"Estimates at n_ctx {strategy.n_ctx}, budget "
              f"{format_bytes(strategy.memory_budget_bytes)}", title_justify="left")
    for col in ("name", "kind", "type", "size", "estimate", "fits", "from"):
        t.add_column(col, justify="right" if col in ("size", "estimate") else "left")
    for m, e, s in rows:
        fits = {"missing": "[red]file missing[/]", "damaged": "[red]damaged[/]"}.get(
            s, "[green]yes[/]" if e is not None and e <= strategy.memory_budget_bytes else ("[red]no[/]" if e else "-"))
        origin = m.repo if m.source == "hub" else m.path
        t.add_row(m.name, m.kind, m.file_type, format_bytes(m.size_bytes), format_bytes(e) if e else "-", fits,
                  escape(origin or ""))
    console().print(t)


def rm(
    name: Annotated[str, typer.Argument(help="A model name from 'orion list'.", autocompletion=model_names)],
    json_output: Annotated[bool, typer.Option("--json", help="Print what was removed as JSON.")] = False,
) -> None:
    """Remove a model: a fetched one's files leave the HF cache; an imported one is only forgotten."""
    from ..models import remove_model
    from ..units import format_bytes

    model, freed = remove_model(name)
    if json_output:
        from ._output import print_json

        print_json({"removed": name, "freed_bytes": freed, "kept_file": model.path if model.source == "import" else None})
        return
    from ._output import console

    if model.source == "import":
        console().print(f"Forgot [bold]{name}[/]; your file {model.path} is untouched.")
    else:
        console().print(f"Removed [bold]{name}[/]: {format_bytes(freed)} freed from the Hugging Face cache.")


def inspect(
    model: Annotated[str, typer.Argument(help="A .gguf path, a model name, org/repo or org/repo/file.gguf.", autocompletion=model_names)],
    ctx: Annotated[Optional[int], typer.Option(help="Context size for the estimate (default: the strategy's).", metavar="N")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the header summary and estimate as JSON.")] = False,
    rpc: Annotated[Optional[str], typer.Option("--rpc", help="Plan the split with other machines' 'orion rpc-server's: host:port[=SIZE],... (SIZE caps what goes there; default: its free memory). Default: the strategy's rpc_servers.", metavar="HOST:PORT[=SIZE],...")] = None,
) -> None:
    """Show a GGUF's header (architecture, type, layers, heads, context) and its memory estimate.

    Works on a local file, a fetched or imported model, or a file on the Hub,
    which is read with HTTP range requests, without downloading it.
    """
    from ..estimate import estimate_memory
    from ..gguf_header import read_local_header
    from ..models import resolve
    from ..strategy import load_strategy

    strategy = load_strategy({"n_ctx": ctx, "rpc_servers": rpc})
    ref = resolve(model)
    projector = None
    if ref.path is not None:
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
        where = f"{ref.repo}/{ref.filename} (read remotely)"
    else:
        return _inspect_repo(ref, strategy, ctx, json_output)

    from ..engine import machine_settings

    if strategy.rpc_servers:
        return _inspect_split(header, where, strategy, json_output)
    est = estimate_memory(header, strategy.n_ctx, machine_settings(), projector=projector)
    if json_output:
        from ._output import print_json

        print_json({"source": where, "header": header.summary(), "estimate": est.to_dict(),
                    "budget_bytes": strategy.memory_budget_bytes, "fits": est.total_bytes <= strategy.memory_budget_bytes})
        return
    from ._output import console
    from ._render import estimate_table, header_table

    out = console()
    out.print(header_table(header.summary(), title=where))
    out.print()
    out.print(estimate_table(est, strategy.memory_budget_bytes))


def _inspect_split(header, where: str, strategy, json_output: bool) -> None:
    """inspect --rpc: the split across this machine and the RPC servers, each part's arithmetic."""
    from ..engine import machine_settings
    from ..rpc import remote_devices_now
    from ..rpc_endpoints import parse_rpc_servers
    from ..placement import rpc_settings, split_plan
    from ..units import format_bytes

    servers = remote_devices_now(parse_rpc_servers(strategy.rpc_servers), strategy.pressure_high)
    plan = split_plan(header, strategy.n_ctx, strategy, rpc_settings(machine_settings()), remote=servers)
    fits = plan.local_fits and plan.gpu_fits
    if json_output:
        from ._output import print_json

        print_json({"source": where, "header": header.summary(), "estimate": plan.cpu.to_dict(),
                    "budget_bytes": strategy.memory_budget_bytes, "servers": [d.to_dict() for d in servers],
                    "split": plan.to_dict(), "fits": fits})
        return
    from ._output import console
    from ._render import estimate_table, header_table

    out = console()
    out.print(header_table(header.summary(), title=where))
    out.print()
    out.print(estimate_table(plan.cpu, strategy.memory_budget_bytes))
    out.print()
    for d in servers:  # how each budget was found (a CPU server's RAM is reported all free)
        out.print(f"[bold]{d.name}[/] budget: {d.budget_how}", highlight=False)
    out.print(f"[bold]split[/] at n_ctx {strategy.n_ctx} ({plan.reason}): {plan.describe()}", highlight=False)
    for name, g, b in zip(plan.devices, plan.gpus, plan.gpu_budgets):
        if g.n_layers:
            out.print(f"  {name}: {g.arithmetic()} (budget {format_bytes(b)})", highlight=False)
    if not fits:
        out.print(f"[bold red]does not fit:[/] {plan.refusal()}", highlight=False)


def _inspect_repo(ref, strategy, ctx, json_output: bool) -> None:
    from ..fetch import plan_fetch
    from ._output import console, err_console
    from ._render import candidates_table

    with err_console().status(f"Reading GGUF headers of {ref.repo}…"):
        plan = plan_fetch(ref, strategy, n_ctx=ctx)
    if json_output:
        from ._output import print_json

        print_json(plan.to_dict())
        return
    console().print(candidates_table(plan))
