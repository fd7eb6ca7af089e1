"""``orion run``: a model's answer to a prompt, or a chat REPL, through a :class:`~orion_cli.chat.ChatSession`.

Who answers is decided in the server layer (``server.remote.chat_backend``: the running
``orion serve``, else this process); this module parses, reads lines and prints.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import CtxOpt, GpuLayersOpt, KvTypeOpt, LocalOpt, ModelArg, RpcOpt, ThreadsOpt, json_option
from ._output import examples, out

EXAMPLES = examples(
    ("orion run gemma3-270m 'The capital of France is'", "complete a prompt, streamed"),
    ("orion run mistral", "a chat REPL (/load, /ps, /clear, /bye)"),
    ("echo 'Hello' | orion run gemma3-270m", "the prompt from stdin"),
    ("orion run llava 'What is this?' --image cat.png", "a vision model"),
    ("orion run model.gguf 'Hi' --json --temperature 0", "one JSON object with text and timings"),
    ("orion run big --rpc 192.168.1.20:50052", "split with another machine's 'orion rpc-server'"),
)

REPL_HELP = """Commands: /load NAME (switch model), /ps (loaded models), /clear (forget the conversation),
/bye (quit). End a line with \\ to continue it; wrap several lines in \"\"\" to send them at once."""


@json_option("Print one JSON object at the end: text and timings.")
def run(
    model: ModelArg,
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; without it: stdin when piped, else a REPL.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.", metavar="N")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.", metavar="T")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.", metavar="P")] = 0.95,
    seed: Annotated[Optional[int], typer.Option(help="Random seed, for repeatable sampling.", metavar="N")] = None,
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    system: Annotated[Optional[str], typer.Option(help="A system prompt (chat models).", metavar="TEXT")] = None,
    image: Annotated[Optional[list[Path]], typer.Option(help="An image for a vision model; repeatable.", metavar="PATH")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print load time and prompt/generation tokens per second.")] = False,
    local_only: LocalOpt = False,
    rpc: RpcOpt = None,
) -> None:
    """Run a model: stream its answer to PROMPT, or chat with it in a REPL.

    A model that is not here yet is fetched first (the quantization that fits,
    as 'orion fetch --auto'). Models load through the model manager, which
    keeps the strategy's cap, memory budget and keep-alive. With 'orion serve'
    running, the server answers, the REPL's too (the model stays loaded there);
    --image, --ctx, --kv-type, --threads, --gpu-layers and --rpc work in this
    process.

    With --rpc, a model too big for this machine is split with other machines
    running 'orion rpc-server': orion sizes each part from each machine's
    budget, prints the split, and refuses with the arithmetic when the machines
    together cannot hold it.
    """
    from .._debug import debug_enabled
    from ..chat import ChatSession, LocalChat
    from ..engine.ggml_rpc import StallWatchdog
    from ..errors import InvalidValue
    from ..limits import SEED, TEMPERATURE, TOP_P, max_tokens_range
    from ..loading import check_image, local_model, manager_for
    from ..server.remote import chat_backend
    from ..strategy import load_strategy

    # the server's ranges (orion_cli.limits): what it would refuse is refused here, before any load
    strategy = load_strategy({"n_ctx": ctx, "kv_type": kv_type, "threads": threads, "n_gpu_layers": gpu_layers,
                              "rpc_servers": rpc})
    if not max_tokens_range(strategy.n_ctx).contains(max_tokens):
        raise InvalidValue(f"--max-tokens {max_tokens} must be at least 1 and at most the context ({strategy.n_ctx})",
                           hint="for example 256, or a larger --ctx")
    TEMPERATURE.check("--temperature", temperature)
    TOP_P.check("--top-p", top_p)
    if seed is not None:
        SEED.check("--seed", seed)
    images = [check_image(p) for p in image or []]
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise InvalidValue("the prompt from stdin is empty", hint="pipe some text, or give PROMPT")
    repl = prompt is None
    watchdog = StallWatchdog.for_run()  # a model split over RPC servers that stop answering: exit 6, not a hang
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def on_event(event) -> None:
        if verbose or debug_enabled() or repl:
            out.note(f"{event.kind}: {event.detail}")

    def on_model(model) -> None:
        watchdog.watch(lambda: model.decode_steps)
        if not repl and debug_enabled() and not model.has_chat_template and not model.is_vision:
            from ..messages import fallback_format

            out.note(f"no chat template in this model: a first prompt is continued as plain text, a conversation "
                     f"is given in the {fallback_format(model.header.architecture)} format")

    def make_local(name: str) -> LocalChat:
        local = local_model(name, strategy, fetch_progress=_fetch_progress())
        if images and not local.projector_path:
            raise InvalidValue(f"{local.name} is a text-only model: it has no projector for --image",
                               hint="use a vision model such as llava or bakllava")
        manager = manager_for(strategy, on_event=on_event, timer=repl)
        try:
            backend = LocalChat(manager, local, strategy, sampling,
                                progress=watchdog.beating(None if repl else _load_progress(local.name)),
                                on_model=on_model)
        except BaseException:
            manager.close()
            raise
        _say_split(backend.request, strategy)
        watchdog.serve(e for e, _, _ in backend.request.remote)
        return backend

    def moved(message: str) -> None:
        out.notice(f"{message}; " + ("the conversation goes on in this process" if repl else "answering in this process"))

    # the options only this process honours keep the work here
    here = local_only or bool(images) or any(v is not None for v in (ctx, kv_type, threads, gpu_layers, rpc))
    session = ChatSession(chat_backend(model, sampling, make_local, local=here, notice=moved), system=system)
    try:
        if repl:
            _repl(session, watchdog)
        else:
            with watchdog.armed():
                _once(session, prompt, images, verbose)
    finally:
        watchdog.close()
        session.close()


def _once(session, prompt: str, images, verbose: bool) -> None:
    """One answer, streamed (or one JSON document at the end, with --json)."""
    from ..engine import Timings

    timings = Timings()
    on_piece, on_restart = _printer()
    reply = session.send(prompt, on_piece, on_restart=on_restart, images=images, timings=timings)
    out.write("\n")
    served = {"served_by": reply.via} if reply.via else {}
    out.result({"model": reply.model, "text": reply.text, "timings": timings.to_dict()} | served,
               lambda: _print_timings(timings) if verbose else None)


def _fetch_progress():
    """Callbacks drawing a download bar; Rich's progress module is imported only if a fetch starts."""
    state: dict = {}

    def on_file(name: str, total: int, have: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        from ._output import err_console

        if "progress" not in state:
            state["progress"] = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                                         DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                         console=err_console(), disable=not err_console().is_terminal)
            state["progress"].start()
        state["task"] = state["progress"].add_task(f"fetching {name}", total=total or None, completed=have)

    def on_bytes(n: int) -> None:
        progress = state["progress"]
        progress.advance(state["task"], n)
        task = progress.tasks[-1]
        if task.total and task.completed >= task.total:
            progress.stop()

    return on_file, on_bytes


def _say_split(request, strategy) -> None:
    """Where the layers of a model split over RPC servers go (stderr: the answer stays clean)."""
    if request.remote:
        out.note(f"split: {request.placement}")
    elif strategy.rpc_servers:
        out.note("split: none, it fits this machine (no layer sent to the RPC servers)")


def _load_progress(name: str):
    """A load bar on a terminal (llama.cpp reports load progress from 0 to 1); None elsewhere."""
    from ._output import err_console

    if not err_console().is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn

    progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                        TextColumn("{task.percentage:>3.0f}%"), console=err_console(), transient=True)
    task = progress.add_task(f"loading {name}", total=1.0)

    def update(value: float) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=value)
        if value >= 1.0:
            progress.stop()

    return update


def _print_timings(t) -> None:
    out.note(f"load {t.load_s:.2f} s · prompt {t.prompt_tokens} tokens at {t.prompt_tok_s:.1f} tok/s"
             f" · generated {t.gen_tokens} tokens at {t.gen_tok_s:.1f} tok/s")


def _read_prompt() -> str | None:
    """One prompt from the terminal: continued lines (trailing \\) or a triple-quoted block."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            try:
                lines.append(input("... "))
            except EOFError:
                break
        lines[-1] = lines[-1].rstrip().removesuffix('"""')
        return "\n".join(lines).strip()
    while line.endswith("\\"):
        try:
            line = line[:-1] + "\n" + input("... ")
        except EOFError:
            break
    return line


@contextmanager
def _line_history():
    """Line editing and a history file for input() (where readline exists)."""
    try:
        import readline
    except ImportError:
        yield
        return
    from ..paths import orion_home

    history = orion_home() / "history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    try:
        yield
    finally:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass


def _repl(session, watchdog=None) -> None:
    """The chat REPL: read a line, hand it to the session, print the answer as it streams."""
    from ..errors import OrionError
    from ._output import escape

    out.set_mode("human")  # the REPL is for people: --json shapes a one-shot answer
    backend = session.backend
    served = f" (served by {backend.via})" if backend.via else ""
    out.text(f"[dim]{escape(backend.name)}{escape(served)} · {escape(REPL_HELP)}[/]")
    with _line_history():
        while True:
            text = _read_prompt()
            if text is None or text.strip() in ("/bye", "/exit", "/quit"):
                return
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    _repl_command(text, session)
                elif watchdog is not None:
                    with watchdog.armed():
                        _answer(session, text)
                else:
                    _answer(session, text)
            except OrionError as exc:  # a prompt past the context, a full queue...: one line, the REPL goes on
                out.error(exc.one_line() + ("; /clear starts the conversation afresh"
                                            if session.history and not text.startswith("/") else ""))


def _printer():
    """``on_piece`` and ``on_restart`` for :meth:`ChatSession.send`: each piece on stdout as it
    comes; an answer asked again (the server went away half-way) starts on its own line."""
    printed: list[str] = []

    def on_piece(piece: str) -> None:
        printed.append(piece)
        out.write(piece)

    def on_restart() -> None:
        if printed:
            out.write("\n")

    return on_piece, on_restart


def _answer(session, text: str) -> None:
    """Write an answer as it streams (Ctrl-C stops it, keeping what came)."""
    on_piece, on_restart = _printer()
    try:
        session.send(text, on_piece, on_restart=on_restart)
    except KeyboardInterrupt:
        from ._output import err_console

        err_console().print("\n[dim](stopped)[/]", markup=True)
    out.write("\n")


def _repl_command(text: str, session) -> None:
    """A REPL command: /load NAME, /ps, /clear, /help."""
    from ..errors import OrionError
    from ._output import escape

    cmd, _, arg = text.strip().partition(" ")
    if cmd == "/load" and arg:
        try:
            session.load(arg.strip())
        except OrionError as exc:  # a wrong name costs one line, not the conversation
            out.text(f"[red]error:[/] {escape(exc.one_line())}; still talking to the same model")
            return
        out.text(f"[dim]now talking to {escape(arg.strip())}[/]")
    elif cmd == "/ps":
        _print_loaded(session.loaded())
    elif cmd == "/clear":
        session.clear()
        out.text("[dim]conversation cleared[/]")
    elif cmd == "/help":
        out.text(escape(REPL_HELP))
    else:
        out.text(f"[red]unknown command {escape(cmd)}[/]; {escape(REPL_HELP)}")


def _print_loaded(doc: dict) -> None:
    """/ps: one line per loaded model, then the count, the budget (and the keep-alive, here)."""
    from ..units import format_bytes
    from ._output import escape

    for m in doc["models"]:
        state = "in use" if m["in_use"] else f"idle {m['idle_s']:.0f} s"
        out.text(escape(f"{m['name']:24s} {format_bytes(m['estimate_bytes']):>10s}  {state}"
                        f"{', pinned' if m['pinned'] else ''}"))
    line = f"{len(doc['models'])} of {doc['max_models']} loaded; budget {format_bytes(doc['budget_bytes'])}"
    if "keep_alive_s" in doc:
        keep = "never" if doc["keep_alive_s"] is None else f"{doc['keep_alive_s']} s"
        line += f"; unload after {keep} idle"
    out.text(f"[dim]{line}[/]")
