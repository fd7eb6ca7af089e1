"""The ``orion`` command: one thin module per subcommand; errors become one line here.

Heavy libraries (llama_cpp, huggingface_hub, numpy) are imported inside the
functions that use them, so ``orion --help`` starts fast.
"""

from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, OrionError, internal_error_line

app = typer.Typer(
    name="orion",
    help=(
        "Pick, fetch, fit and run the right open model for the machine you have.\n\n"
        "Start with 'orion profile': it detects memory, CPU, GPU and disk, picks a memory "
        "tier and writes the strategy every other command reads."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain (click) help: typer's Rich help imports markdown-it and pygments, ~120 ms
    # of the 0.3 s start-up budget, measured with -X importtime.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"orion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and native library logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["ORION_DEBUG"] = "1"


from . import convert as _convert  # noqa: E402
from . import embed as _embed  # noqa: E402
from . import evaluate as _evaluate  # noqa: E402
from . import fetch as _fetch  # noqa: E402
from . import models as _models  # noqa: E402
from . import profile as _profile  # noqa: E402
from . import quantize as _quantize  # noqa: E402
from . import run as _run  # noqa: E402
from . import strategy as _strategy  # noqa: E402

app.command("profile", epilog=_profile.EXAMPLES, short_help="Detect this machine, pick a memory tier, write the strategy.")(_profile.profile)
app.command("strategy", epilog=_strategy.EXAMPLES, short_help="Show the settings in force and where each comes from.")(_strategy.strategy)
app.command("run", epilog=_run.EXAMPLES, short_help="Run a model: a prompt, or a chat REPL.")(_run.run)
app.command("fetch", epilog=_fetch.EXAMPLES, short_help="Download the quantization of a model that fits this device.")(_fetch.fetch)
app.command("import", epilog=_models.IMPORT_EXAMPLES, short_help="Register a local GGUF under a short name.")(_models.import_)
app.command("list", epilog=_models.LIST_EXAMPLES, short_help="List the models here, with memory estimates.")(_models.list_)
app.command("rm", epilog=_models.RM_EXAMPLES, short_help="Remove a model (its cached files; never your own).")(_models.rm)
app.command("convert", epilog=_convert.EXAMPLES, short_help="Convert a BERT encoder (safetensors) to GGUF, no torch.")(_convert.convert)
app.command("embed", epilog=_embed.EMBED_EXAMPLES, short_help="Embed files into a collection (float16, re-runs skip unchanged).")(_embed.embed)
app.command("search", epilog=_embed.SEARCH_EXAMPLES, short_help="Search a collection by meaning.")(_embed.search)
app.command("collections", epilog=_embed.COLLECTIONS_EXAMPLES, short_help="List, show or delete collections.")(_embed.collections)
app.command("quantize", epilog=_quantize.EXAMPLES, short_help="Quantize a GGUF to any level (Q4_K_M, Q8_0, F16...).")(_quantize.quantize)
app.command("eval", epilog=_evaluate.EXAMPLES, short_help="Perplexity, speed and memory of a model or a quantization ladder.")(_evaluate.evaluate)
app.command("inspect", epilog=_models.INSPECT_EXAMPLES, short_help="Show a GGUF's header and memory estimate.")(_models.inspect)


def _print_error(line: str) -> None:
    from ._output import err_console

    err_console().print(f"[bold red]error:[/] {_escape(line)}", highlight=False, soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _usage_error_class() -> type[Exception]:
    # Typer vendors click in recent releases (typer._click) and uses click
    # itself in older ones: find the base of usage errors either way.
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``orion`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("ORION_DEBUG") == "1"
    try:
        code = app(args=args, prog_name="orion", standalone_mode=False)
    except OrionError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        _print_error(exc.one_line())
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except _usage_error_class() as exc:  # unknown option, missing argument: usage and exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line, the traceback only with --debug
        if debug:
            import traceback

            traceback.print_exc()
        _print_error(internal_error_line(exc))
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)
