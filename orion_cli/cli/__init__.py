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
        from .._debug import enable_debug

        enable_debug()


# (command, module, function, examples attribute, one-line help), in --help order.
COMMANDS = [
    ("profile", "profile", "profile", "EXAMPLES", "Detect this machine, pick a memory tier, write the strategy."),
    ("strategy", "strategy", "strategy", "EXAMPLES", "Show the settings in force and where each comes from."),
    ("run", "run", "run", "EXAMPLES", "Run a model: a prompt, or a chat REPL."),
    ("fetch", "fetch", "fetch", "EXAMPLES", "Download the quantization of a model that fits this device."),
    ("import", "models", "import_", "IMPORT_EXAMPLES", "Register a local GGUF (or encoder folder) under a short name."),
    ("list", "models", "list_", "LIST_EXAMPLES", "List the models here, with memory estimates."),
    ("rm", "models", "rm", "RM_EXAMPLES", "Remove a model (its cached files; never your own)."),
    ("inspect", "models", "inspect", "INSPECT_EXAMPLES", "Show a GGUF's header and memory estimate."),
    ("convert", "convert", "convert", "EXAMPLES", "Convert a BERT encoder (safetensors) to GGUF, no torch."),
    ("embed", "embed", "embed", "EMBED_EXAMPLES", "Embed files into a collection (float16, re-runs skip unchanged)."),
    ("search", "embed", "search", "SEARCH_EXAMPLES", "Search a collection by meaning."),
    ("collections", "embed", "collections", "COLLECTIONS_EXAMPLES", "List, show or delete collections."),
    ("quantize", "quantize", "quantize", "EXAMPLES", "Quantize a GGUF to any level (Q4_K_M, Q8_0, F16...)."),
    ("eval", "evaluate", "evaluate", "EXAMPLES", "Perplexity, speed and memory of a model or a quantization ladder."),
    ("serve", "serve", "serve", "SERVE_EXAMPLES", "Serve the models and the shared encoder to every client (OpenAI API)."),
    ("rpc-server", "rpc", "rpc_server", "EXAMPLES", "Lend this machine's memory to orion on another machine (RPC)."),
    ("ps", "serve", "ps", "PS_EXAMPLES", "Show the models the server has loaded (--watch: live)."),
    ("load", "serve", "load", "LOAD_EXAMPLES", "Load a model into the server (--pin, --keep-alive)."),
    ("stop", "serve", "stop", "STOP_EXAMPLES", "Unload a model from the server."),
    ("completion", "completion", "completion", "EXAMPLES", "Print the shell completion script (bash, zsh, fish)."),
]

# The variable a completion script sets when the shell asks orion to complete a word.
COMPLETE_VAR = "_ORION_COMPLETE"


def _register(names: set[str] | None = None) -> None:
    """Add commands to the app: all of them, or only those named.

    Typer inspects every registered function's signature on each start; a run of
    one command registers only that one (measured: 60 ms less for `orion profile`).
    """
    from importlib import import_module

    from ._options import command_class

    for name, module, func, examples, short in COMMANDS:
        if names is not None and name not in names:
            continue
        mod = import_module(f"{__name__}.{module}")
        command = getattr(mod, func)
        app.command(name, epilog=getattr(mod, examples), short_help=short, cls=command_class(command))(command)


def _command_in(args: list[str]) -> str | None:
    """The subcommand named on the command line, if any (the first word that is not an option)."""
    known = {c[0] for c in COMMANDS}
    for arg in args:
        if not arg.startswith("-"):
            return arg if arg in known else None
    return None


def _print_error(line: str) -> None:
    from ._output import out

    out.error(line)


def _usage_line(exc) -> str:
    """Click's message for a usage error, as orion's one line: what is wrong, then where to look."""
    message = exc.format_message().strip().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = f"see '{ctx.command_path} --help'" if ctx is not None else "see 'orion --help'"
    return f"{message}: {where}"


def _usage_error_class() -> type[Exception]:
    # Typer vendors click in recent releases (typer._click) and uses click
    # itself in older ones: find the base of usage errors either way.
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _environment_error(exc: BaseException) -> OrionError | None:
    """An error of the machine rather than of orion: OSError (disk, permissions) and SQLite's
    "database is locked" get their own line and code, not "internal error"."""
    from ..errors import from_os_error, from_sqlite_error

    if isinstance(exc, OSError):
        from .._text import clip

        for attr in ("filename", "filename2"):  # a 300-character name is named, cut
            if isinstance(getattr(exc, attr, None), str):
                setattr(exc, attr, clip(getattr(exc, attr), 200))
        return from_os_error(exc)
    if type(exc).__module__ == "sqlite3" and type(exc).__name__ in ("OperationalError", "DatabaseError"):
        from ..paths import orion_home

        return from_sqlite_error(exc, orion_home() / "embeddings.db")
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``orion`` console script."""
    from .._debug import debug_enabled

    args = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get(COMPLETE_VAR):  # the shell asks for completions: only then is this path taken
        from typer.completion import completion_init

        completion_init()
        if not app.registered_commands:
            _register()
    if not app.registered_commands:
        command = _command_in(args)
        _register({command} if command else None)
    try:
        code = app(args=args, prog_name="orion", standalone_mode=False)
    except OrionError as exc:
        if debug_enabled():
            import traceback

            traceback.print_exc()
        _print_error(exc.one_line())
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except _usage_error_class() as exc:  # unknown option, missing argument, not a number: one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # 'orion' alone: the help, as click shows it
            exc.show()
        else:
            _print_error(_usage_line(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:  # the environment (a full disk, a permission, a locked store), else a bug
        if debug_enabled():
            import traceback

            traceback.print_exc()
        known = _environment_error(exc)
        if known is not None:
            _print_error(known.one_line())
            sys.exit(known.exit_code)
        _print_error(internal_error_line(exc))
        sys.exit(EXIT_INTERNAL)
    if code == EXIT_INTERRUPTED:  # Ctrl-C: typer turns it into this code without a word
        _print_error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
