"""Options shared by several commands, declared once (as hf's ``_cli_utils.py`` does), and the
command class that gives a command ``--json``, bounds its number options and sets the output mode
before it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from typer.core import TyperCommand, TyperOption

from ._output import out

# ---------------------------------------------------------------- --json, for every command that has it

JSON_PARAM = "json_output"
F = TypeVar("F", bound=Callable)


def json_option(help: str) -> Callable[[F], F]:
    """Give a command ``--json`` (``help``: its line in --help). The command does not declare the
    option: it hands its result to ``_output.out``, whose mode the option sets."""

    def mark(func: F) -> F:
        func.json_help = help  # type: ignore[attr-defined]
        return func

    return mark


def _bounded(param) -> None:
    """Give a number option (int or float) its range from ``orion_cli.limits``: a value out of it
    (nan, inf, 1e400, a 400-digit integer, a negative count) is an error line while the command line
    is parsed, before the command asks a server, the Hub or llama.cpp anything."""
    base = type(param.type)
    names = {c.__name__ for c in base.__mro__}
    if "BoolParamType" in names or not names & {"IntParamType", "FloatParamType"}:
        return
    if getattr(param.type, "orion_range", None) is not None:
        return
    from .._text import clip
    from ..errors import InvalidValue
    from ..limits import option_range

    integer = "IntParamType" in names
    limit = option_range(param.name or "", integer)
    flag = next((o for o in param.opts if o.startswith("--")), param.opts[0] if param.opts else param.name)

    class Bounded(base):  # type: ignore[misc, valid-type]
        orion_range = limit

        def convert(self, value, param, ctx):
            if isinstance(value, str) and len(value.strip()) > 100:  # int() refuses 4,300 digits, slowly
                raise InvalidValue(f"{flag} {clip(value.strip())} is out of range", hint=f"give {limit.describe()}")
            number = super().convert(value, param, ctx)
            return limit.check(flag, number, shown=value if isinstance(value, str) else None)

    checked = Bounded.__new__(Bounded)
    checked.__dict__.update(param.type.__dict__)
    param.type = checked


class OrionCommand(TyperCommand):
    """A leaf command: its number options are bounded (``orion_cli.limits``), and the one output
    object is put in its mode before the command runs (human, or JSON with ``--json`` on the
    commands that have it)."""

    json_help: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _bounded(param)
        if self.json_help:
            self.params.append(TyperOption(param_decls=["--json", JSON_PARAM], is_flag=True, default=False,
                                           help=self.json_help))

    def invoke(self, ctx):
        out.set_mode("json" if ctx.params.pop(JSON_PARAM, False) else "human")
        return super().invoke(ctx)


def command_class(func: Callable) -> type[OrionCommand]:
    """The command class for ``func``: with ``--json`` when :func:`json_option` marked it."""
    help = getattr(func, "json_help", None)
    return type("OrionJsonCommand", (OrionCommand,), {"json_help": help}) if help else OrionCommand


# ---------------------------------------------------------------- shared options


def model_names(incomplete: str) -> list[str]:
    """Model names for a MODEL argument: the registry's, then the catalog's (no network)."""
    from ..models import Registry, catalog

    try:
        names = list(Registry().all())
    except Exception:  # a damaged registry must not break the shell's completion
        names = []
    names += [n for n in catalog() if n not in names]
    return [n for n in names if n.startswith(incomplete)]


ModelArg = Annotated[str, typer.Argument(
    help="A model name (orion list), a catalog name, org/repo, or a .gguf path.", autocompletion=model_names)]
LocalModelArg = Annotated[str, typer.Argument(
    help="A .gguf file or a model name from 'orion list'.", autocompletion=model_names)]
CtxOpt = Annotated[Optional[int], typer.Option(
    "--ctx", help="Context size in tokens (default: the strategy's).", metavar="N")]
KvTypeOpt = Annotated[Optional[str], typer.Option(
    "--kv-type", help="KV cache type, for K and V or as K/V: f16, q8_0 (34/64 of f16's memory) or q4_0 (18/64), "
                      "e.g. q8_0/q4_0. Default: the tier's (orion strategy shows it).", metavar="TYPE[/TYPE]")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads (default: the strategy's).", metavar="N")]
GpuLayersOpt = Annotated[Optional[str], typer.Option(
    "--gpu-layers", help="Layers on the GPU: auto (as many as fit its budget), N, -1 (all) or 0 (CPU only). "
                         "Default: the strategy's.", metavar="N|auto")]
RpcOpt = Annotated[Optional[str], typer.Option(
    "--rpc", help="Other machines' 'orion rpc-server's to split a model with: host:port[=SIZE],... (SIZE caps "
                  "what goes there; default: its free memory). Default: the strategy's rpc_servers.",
    metavar="HOST:PORT[=SIZE],...")]
LocalOpt = Annotated[bool, typer.Option(
    "--local", help="Work in this process even when 'orion serve' is running.")]
GgufOutOpt = Annotated[Path, typer.Option("--output", "-o", help="The GGUF file to write.", metavar="OUT.gguf")]
ReplaceOutOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
