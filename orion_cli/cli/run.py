"""``orion run``: load a model through the manager and generate, once or in a REPL."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .completion import model_names

from ._output import examples

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


def run(
    model: Annotated[str, typer.Argument(help="A model name (orion list), a catalog name, org/repo, or a .gguf path.", autocompletion=model_names)],
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; without it: stdin when piped, else a REPL.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.", metavar="N")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.", metavar="T")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.", metavar="P")] = 0.95,
    seed: Annotated[Optional[int], typer.Option(help="Random seed, for repeatable sampling.", metavar="N")] = None,
    ctx: Annotated[Optional[int], typer.Option(help="Context size (default: the strategy's).", metavar="N")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: the strategy's).", metavar="N")] = None,
    gpu_layers: Annotated[Optional[str], typer.Option("--gpu-layers", help="Layers on the GPU: auto (as many as fit its budget), N, -1 (all) or 0 (CPU only). Default: the strategy's.", metavar="N|auto")] = None,
    system: Annotated[Optional[str], typer.Option(help="A system prompt (chat models).", metavar="TEXT")] = None,
    image: Annotated[Optional[list[Path]], typer.Option(help="An image for a vision model; repeatable.", metavar="PATH")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end: text and timings.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print load time and prompt/generation tokens per second.")] = False,
    local_only: Annotated[bool, typer.Option("--local", help="Load the model in this process even when 'orion serve' is running.")] = False,
    rpc: Annotated[Optional[str], typer.Option("--rpc", help="Split the model with other machines' 'orion rpc-server's: host:port[=SIZE],... (SIZE caps what goes there; default: its free memory). Default: the strategy's rpc_servers.", metavar="HOST:PORT[=SIZE],...")] = None,
) -> None:
    """Run a model: stream its answer to PROMPT, or chat with it in a REPL.

    A model that is not here yet is fetched first (the quantization that fits,
    as 'orion fetch --auto'). Models load through the model manager, which
    keeps the strategy's cap, memory budget and keep-alive. With 'orion serve'
    running, the server answers, the REPL's too (the model stays loaded there);
    --image, --ctx, --threads, --gpu-layers and --rpc work in this process.

    With --rpc, a model too big for this machine is split with other machines
    running 'orion rpc-server': orion sizes each part from each machine's
    budget, prints the split, and refuses with the arithmetic when the machines
    together cannot hold it.
    """
    from ..errors import InvalidValue
    from ..loading import check_image, local_model, manager_for
    from ..strategy import load_strategy
    from ._output import err_console

    if max_tokens < 1:
        raise InvalidValue(f"--max-tokens {max_tokens} must be at least 1", hint="for example 256")
    strategy = load_strategy({"n_ctx": ctx, "threads": threads, "n_gpu_layers": gpu_layers, "rpc_servers": rpc})
    images = [check_image(p) for p in image or []]

    debug = _debug()
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise InvalidValue("the prompt from stdin is empty", hint="pipe some text, or give PROMPT")
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if not local_only and not images and ctx is None and threads is None and gpu_layers is None and rpc is None:
        from ..server.discovery import live_server

        info = live_server()
        if info is not None and prompt is None:
            return _repl_remote(info, _server_name(model), strategy, sampling, system)
        if info is not None and _once_remote(info, _server_name(model), prompt,
                                             system=system, json_output=json_output, verbose=verbose, **sampling):
            return
    local = local_model(model, strategy, fetch_progress=_fetch_progress())
    if images and not local.projector_path:
        raise InvalidValue(f"{local.name} is a text-only model: it has no projector for --image",
                           hint="use a vision model such as llava or bakllava")

    def on_event(event) -> None:
        if verbose or debug or prompt is None:
            err_console().print(f"[dim]{event.kind}: {event.detail}[/]", highlight=False)

    manager = manager_for(strategy, on_event=on_event, timer=prompt is None)
    try:
        if prompt is None:
            _repl(manager, local, strategy, sampling, system)
            return
        _once(manager, local, strategy, prompt, system=system, images=images, json_output=json_output,
              verbose=verbose, debug=debug, **sampling)
    finally:
        manager.close()


def _server_name(model: str) -> str:
    """The name to send to a server: a path made absolute (the server's folder is not ours)."""
    path = Path(model).expanduser()
    return str(path.absolute()) if path.exists() else model


def _remote_chat(client, model: str, messages: list[dict], sampling: dict, timings=None):
    """The server's answer to ``messages``, piece by piece (its timings into ``timings``)."""
    body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            **{k: v for k, v in sampling.items() if v is not None}}
    for doc in client.events("POST", "/v1/chat/completions", body):
        if doc.get("timings") and timings is not None:
            t = doc["timings"]
            timings.load_s, timings.prompt_tokens, timings.gen_tokens = t["load_s"], t["prompt_tokens"], \
                t["generated_tokens"]
            timings.prompt_s = t["prompt_tokens"] / t["prompt_tok_s"] if t["prompt_tok_s"] else 0.0
            timings.gen_s = t["generated_tokens"] / t["generation_tok_s"] if t["generation_tok_s"] else 0.0
        for choice in doc.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                yield piece


def _print_answer(pieces) -> str:
    """Write an answer as it streams (Ctrl-C stops it, keeping what came); the text."""
    from ._output import err_console

    answer = []
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            answer.append(piece)
    except KeyboardInterrupt:
        err_console().print("\n[dim](stopped)[/]")
    sys.stdout.write("\n")
    return "".join(answer)


def _repl_command(text: str, conversation: list[dict], out, *, load, ps) -> None:
    """A REPL command (/load NAME, /ps, /clear, /help); ``load(name)`` and ``ps()`` do the model work."""
    from ..errors import OrionError
    from ..server.client import ServerGone

    cmd, _, arg = text.strip().partition(" ")
    if cmd == "/load" and arg:
        try:
            load(arg.strip())
        except ServerGone:
            raise
        except OrionError as exc:  # a wrong name costs one line, not the conversation
            from rich.markup import escape

            out.print(f"[red]error:[/] {escape(exc.one_line())}; still talking to the same model")
            return
        conversation.clear()
        out.print(f"[dim]now talking to {arg.strip()}[/]")
    elif cmd == "/ps":
        ps()
    elif cmd == "/clear":
        conversation.clear()
        out.print("[dim]conversation cleared[/]")
    elif cmd == "/help":
        out.print(REPL_HELP)
    else:
        out.print(f"[red]unknown command {cmd}[/]; {REPL_HELP}")


def _model_row(name: str, estimate_bytes: int, in_use: bool, idle_s: float, pinned: bool) -> str:
    from ..units import format_bytes

    state = "in use" if in_use else f"idle {idle_s:.0f} s"
    return f"{name:24s} {format_bytes(estimate_bytes):>10s}  {state}{', pinned' if pinned else ''}"


def _repl_remote(info, model: str, strategy, sampling: dict, system: str | None) -> None:
    """The chat REPL with the server doing the work; if it stops answering, the conversation
    goes on in this process (the unanswered prompt is asked again there)."""
    from ..errors import OrionError
    from ..server.client import ServerClient, ServerGone
    from ._output import console, err_console
    from .embed import _notice

    client = ServerClient(info)
    out = console()
    out.print(f"[dim]{model} (served by {info.url}) · {REPL_HELP}[/]", highlight=False)
    conversation: list[dict] = []
    with _line_history():
        while True:
            text = _read_prompt()
            if text is None or text.strip() in ("/bye", "/exit", "/quit"):
                return
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    def load(name: str) -> None:
                        nonlocal model
                        client.post("/api/load", {"model": name})
                        model = name

                    def ps() -> None:
                        for m in client.get("/api/ps")["models"]:
                            out.print(_model_row(m["name"], m["estimate_bytes"], m["in_use"], m["idle_s"], m["pinned"]))

                    _repl_command(text, conversation, out, load=load, ps=ps)
                    continue
                messages = ([{"role": "system", "content": system}] if system else []) + conversation + [
                    {"role": "user", "content": text}]
                answer = _print_answer(_remote_chat(client, model, messages, sampling))
                conversation += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            except ServerGone as exc:
                _notice(f"{exc.message}; the conversation goes on in this process")
                from ..loading import local_model, manager_for

                manager = manager_for(strategy, timer=True)
                try:
                    _repl(manager, local_model(model, strategy), strategy, sampling, system, conversation,
                          pending=None if text.startswith("/") else text)
                finally:
                    manager.close()
                return
            except OrionError as exc:  # an unknown model, a full queue...: say so, keep the conversation
                from rich.markup import escape

                err_console().print(f"[bold red]error:[/] {escape(exc.one_line())}", highlight=False)


def _once_remote(info, model: str, prompt: str, *, system, json_output, verbose, **sampling) -> bool:
    """Answer through the server; False when it went away before answering (then: in-process)."""
    from ..engine import Timings
    from ..server.client import ServerClient, ServerGone
    from .embed import _notice

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    timings, chunks = Timings(), []
    try:
        for piece in _remote_chat(ServerClient(info), model, messages, sampling, timings):
            chunks.append(piece)
            if not json_output:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except ServerGone as exc:
        if chunks and not json_output:
            sys.stdout.write("\n")
        _notice(f"{exc.message}; answering in this process")
        return False
    if json_output:
        from ._output import print_json

        print_json({"model": model, "text": "".join(chunks), "timings": timings.to_dict(), "served_by": info.url})
    else:
        sys.stdout.write("\n")
        if verbose:
            _print_timings(timings)
    return True


def _debug() -> bool:
    import os

    return os.environ.get("ORION_DEBUG") == "1"


def _fetch_progress():
    """Callbacks drawing a download bar; Rich's progress module is imported only if a fetch starts."""
    state: dict = {}

    def on_file(name: str, total: int, have: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        from ._output import err_console

        if "progress" not in state:
            state["progress"] = Progress(TextColumn("{task.description}"), BarColumn(),
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


def _once(manager, local, strategy, prompt, *, system, images, json_output, verbose, debug, **sampling) -> None:
    from ..engine import Timings
    from ..loading import model_request
    from ._output import err_console

    request = model_request(local, strategy, progress=_load_progress(local.name))
    _say_split(request, strategy)
    timings = Timings()
    with manager.use(request) as model:
        timings.load_s = model.load_s
        if debug and not model.has_chat_template and not model.is_vision:
            err_console().print("[dim]no chat template in this model: plain completion[/]")
        pieces = model.generate(prompt, system=system, images=images, timings=timings, **sampling)
        if json_output:
            text = "".join(pieces)
        else:
            out = sys.stdout
            chunks = []
            for piece in pieces:
                out.write(piece)
                out.flush()
                chunks.append(piece)
            text = "".join(chunks)
            out.write("\n")
    if json_output:
        from ._output import print_json

        print_json({"model": local.name, "text": text, "timings": timings.to_dict()})
    elif verbose:
        _print_timings(timings)


def _say_split(request, strategy) -> None:
    """Where the layers of a model split over RPC servers go (stderr: the answer stays clean)."""
    from ._output import err_console

    if request.remote:
        err_console().print(f"[dim]split: {request.placement}[/]", highlight=False)
    elif strategy.rpc_servers:
        err_console().print("[dim]split: none, it fits this machine (no layer sent to the RPC servers)[/]",
                            highlight=False)


def _load_progress(name: str):
    """A load bar on a terminal (llama.cpp reports load progress from 0 to 1); None elsewhere."""
    from ._output import err_console

    if not err_console().is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn

    progress = Progress(TextColumn(f"loading {name}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        console=err_console(), transient=True)
    task = progress.add_task("load", total=1.0)

    def update(value: float) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=value)
        if value >= 1.0:
            progress.stop()

    return update


def _print_timings(t) -> None:
    from ._output import err_console

    err_console().print(f"[dim]load {t.load_s:.2f} s · prompt {t.prompt_tokens} tokens at {t.prompt_tok_s:.1f} tok/s"
                        f" · generated {t.gen_tokens} tokens at {t.gen_tok_s:.1f} tok/s[/]", highlight=False)


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


def _repl(manager, local, strategy, sampling: dict, system: str | None,
          conversation: list[dict] | None = None, pending: str | None = None) -> None:
    from ..engine import Timings
    from ..errors import OrionError
    from ..loading import local_model, model_request
    from ..units import format_bytes
    from ._output import console, err_console

    out = console()
    out.print(f"[dim]{local.name} · {REPL_HELP}[/]", highlight=False)
    request = model_request(local, strategy)
    _say_split(request, strategy)
    conversation = conversation if conversation is not None else []
    with _line_history():
        while True:
            text, pending = (pending, None) if pending else (_read_prompt(), None)
            if text is None or text.strip() in ("/bye", "/exit", "/quit"):
                break
            if not text.strip():
                continue
            if text.startswith("/"):
                def load(name: str) -> None:
                    nonlocal local, request
                    new_local = local_model(name, strategy)
                    new_request = model_request(new_local, strategy)
                    with manager.use(new_request):
                        pass
                    local, request = new_local, new_request

                def ps() -> None:
                    for st in manager.status():
                        out.print(_model_row(st.name, st.estimate_bytes, st.in_use, st.idle_s, st.pinned))
                    keep = "never" if manager.keep_alive_s is None else f"{manager.keep_alive_s} s"
                    out.print(f"[dim]{len(manager.status())} of {manager.max_models} loaded; "
                              f"budget {format_bytes(manager.budget_bytes)}; unload after {keep} idle[/]")

                _repl_command(text, conversation, out, load=load, ps=ps)
                continue
            timings = Timings()
            try:
                with manager.use(request) as model:
                    chat = model.has_chat_template
                    pieces = model.generate(text, system=system, history=conversation if chat else (),
                                            timings=timings, **sampling)
                    answer = _print_answer(pieces)
            except OrionError as exc:  # a message (or a conversation) past the context...: say so, go on
                from rich.markup import escape

                err_console().print(f"[bold red]error:[/] {escape(exc.one_line())}"
                                    + ("; /clear starts the conversation afresh" if conversation else ""),
                                    highlight=False)
                continue
            if chat:
                conversation += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]

