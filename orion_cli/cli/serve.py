"""``orion serve`` and its clients: ``orion ps``, ``orion load``, ``orion stop``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import GpuLayersOpt, KvTypeOpt, RpcOpt, json_option, model_names
from ._output import escape, examples, out

SERVE_EXAMPLES = examples(
    ("orion serve", "share the models and the encoder with every client, on 127.0.0.1:11435"),
    ("orion serve --port 0", "a free port (written to $ORION_HOME/server.json)"),
    ("ORION_API_KEY=secret orion serve --host 0.0.0.0", "on the network, with a key"),
    ("curl localhost:11435/v1/models", "the OpenAI API is under /v1"),
    ("orion serve --allow-paths", "clients may also load GGUF files by absolute path"),
)
PS_EXAMPLES = examples(
    ("orion ps", "the models the server has loaded, their memory and queues"),
    ("orion ps --watch", "a live view: models, memory against the budget, pressure, events"),
    ("orion ps --json", "for scripts"),
)
LOAD_EXAMPLES = examples(
    ("orion load gemma3-270m", "load a model into the server now"),
    ("orion load gemma3-270m --pin", "never evicted or unloaded for inactivity"),
    ("orion load minilm --keep-alive 1h", "this model's own keep-alive"),
)
STOP_EXAMPLES = examples(("orion stop gemma3-270m", "unload a model from the server"),)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; loopback by default.", metavar="HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one).", metavar="N")] = 11435,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="ORION_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on every route but /health.", metavar="KEY")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests a model takes at once (running + waiting); more get HTTP 503.", metavar="N")] = 8,
    parallel: Annotated[int, typer.Option(help="Chat requests to one model decoded together (they share its context).", metavar="N")] = 4,
    gpu_layers: GpuLayersOpt = None,
    kv_type: KvTypeOpt = None,
    rpc: RpcOpt = None,
    allow_paths: Annotated[bool, typer.Option("--allow-paths", envvar="ORION_ALLOW_PATHS", show_envvar=True, help="Clients may also name a GGUF file (or an encoder folder) by absolute path; relative paths stay refused (they would resolve from this server's folder). Risk: any client can then load any model file this user can read, and learn which paths exist.")] = False,
    allow_fetch: Annotated[bool, typer.Option("--allow-fetch", envvar="ORION_ALLOW_FETCH", show_envvar=True, help="Clients may also name a Hub repo or catalog model that is not here: the server downloads it (the quantization that fits) and registers it. Risk: any client can then fill this disk and spend this network.")] = False,
) -> None:
    """Serve the models and the shared encoder to every client (OpenAI-compatible API).

    One process owns the loaded models (the strategy's cap, memory budget,
    keep-alive and pins) and one encoder per embedding model. 'orion run',
    'embed' and 'search' find it through $ORION_HOME/server.json (or ORION_HOST)
    and send their work to it; '--local' keeps them in-process. Ctrl-C stops
    accepting, finishes the requests in flight, unloads and exits.

    Clients name only the models registered here ('orion list': fetched,
    imported, converted) and the built-in encoder (minilm, fetched once if it
    is not here). Any other name, a path or a Hub repo not here, gets one
    answer (404, whether or not such a file exists) unless --allow-paths or
    --allow-fetch says otherwise.
    """
    from ..errors import InvalidValue
    from ..server import serve as run_server
    from ..server.access import ModelAccess
    from ..strategy import load_strategy

    if not 0 <= port <= 65535:
        raise InvalidValue(f"--port {port} is not a port", hint="0 to 65535 (0 picks a free one)")
    if max_queue < 1:
        raise InvalidValue(f"--max-queue {max_queue} must be at least 1", hint="for example 8")
    if not 1 <= parallel <= 64:
        raise InvalidValue(f"--parallel {parallel} must be from 1 to 64", hint="for example 4")
    access = ModelAccess(allow_paths=allow_paths, allow_fetch=allow_fetch)
    if allow_paths or allow_fetch:
        out.notice(f"clients may name the models registered here and {access.describe()}")
    strategy = load_strategy({"n_gpu_layers": gpu_layers, "kv_type": kv_type, "rpc_servers": rpc})
    run_server(strategy, host=host, port=port, api_key=api_key or None, max_queue=max_queue,
               parallel=parallel, access=access)


def _client():
    from ..errors import NotFound
    from ..server.client import ServerClient
    from ..server.discovery import live_server

    said: list[str] = []  # why a server or a server.json that is there is not used (frozen, stale, foreign)
    info = live_server(notice=said.append)
    if info is None:
        if said:  # the reason, in the one error line
            import os

            from .._text import clip

            why = clip(said[-1], 400)
            if os.environ.get("ORION_HOST"):
                raise NotFound(f"the server ORION_HOST names cannot be used: {why}",
                               hint="start orion serve there, or unset ORION_HOST")
            raise NotFound(f"no orion serve is running for this ORION_HOME that can be used: {why}",
                           hint="start one with 'orion serve'")
        raise NotFound("no orion serve is running for this ORION_HOME", hint="start one with 'orion serve'")
    return ServerClient(info, timeout=600)


@json_option("Print the server's answer as JSON.")
def ps(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", metavar="S")] = 1.0,
) -> None:
    """Show the models the server has loaded: memory, idle time, keep-alive, pins, queues.

    Each model's memory on each device (ram, gpu0..., rpc:HOST:PORT): the estimate, what its load
    measured and the error, (estimate - measured) / measured: negative when the estimate fell short.
    The budget counts the measured figure once there is one."""
    from ..errors import InvalidValue

    if interval <= 0:
        raise InvalidValue(f"--interval {interval} must be above 0", hint="for example 1")
    client = _client()
    if out.json or not watch:
        doc = client.get("/api/orion/ps")
        out.result(doc, lambda: _ps_view(doc))
        return
    import time

    from ._output import console

    from rich.live import Live

    try:
        with Live(_ps_view(client.get("/api/orion/ps")), console=console(), auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_ps_view(client.get("/api/orion/ps")), refresh=True)
    except KeyboardInterrupt:
        return


def _ps_view(doc: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ..units import format_bytes

    table = Table(box=None, pad_edge=False)
    # short headings: the table must fit 80 columns (model names fold, nothing else wraps)
    table.add_column("model", overflow="fold")
    for col in ("kind", "type", "memory", "up", "idle", "unloads", "pin", "use", "queue"):
        table.add_column(col, no_wrap=True)
    for m in doc["models"]:
        expires = "never" if m["expires_in_s"] is None else f"in {m['expires_in_s']:.0f} s"
        table.add_row(m["name"], m["kind"], m["type"], format_bytes(m.get("budget_bytes", m["estimate_bytes"])),
                      f"{m['loaded_for_s']:.0f} s", f"{m['idle_s']:.0f} s", expires, "yes" if m["pinned"] else "",
                      str(m["users"]), str(m["queue_depth"]))
    used, budget = doc["used_bytes"], doc["budget_bytes"]
    width = 30
    filled = min(width, round(width * used / budget)) if budget else 0
    level = doc["pressure"]["level"]
    colour = {"normal": "green", "high": "yellow", "critical": "red"}[level]
    bar = Text(f"memory  [{'#' * filled}{'.' * (width - filled)}] {format_bytes(used)} of {format_bytes(budget)} "
               f"budget · {len(doc['models'])}/{doc['max_models']} models · pressure ")
    bar.append(f"{level} ({doc['pressure']['ratio']:.0%})", style=colour)
    events = Text("\n".join(f"{e['kind']:<9} {e['detail']}" for e in doc["events"][-5:]) or "no events yet",
                  style="dim")
    machine = _machine_view(doc["machine"]) if "machine" in doc else Text("")
    if not doc["models"]:
        return Group(Text("no models loaded"), bar, machine, events)
    return Group(table, _memory_view(doc), _served_view(doc), bar, machine, events)


def _served_view(doc: dict):
    """Each model's requests answered, the speed of its last one, and where its layers are."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("model", overflow="fold")
    table.add_column("requests", no_wrap=True, justify="right")
    table.add_column("tok/s", no_wrap=True, justify="right")
    table.add_column("where", overflow="fold")
    for m in doc["models"]:
        speed = m.get("last_tok_s")
        table.add_row(m["name"], str(m.get("requests", "")), "-" if speed is None else f"{speed:.1f}",
                      m.get("placement", ""))
    return table


def _machine_view(machine: dict):
    """The machine's lines (the dashboard's bars, in words): RAM and each GPU, in use, orion's, others'; RPC servers."""
    from rich.text import Text

    from ..units import format_bytes

    ram = machine["ram"]
    lines = [f"RAM    {format_bytes(ram['in_use_bytes'])} of {format_bytes(ram['limit_bytes'])} in use "
             f"({ram['source']}): models {format_bytes(ram['orion_bytes'])}, others {format_bytes(ram['others_bytes'])}"]
    for g in machine["gpus"]:
        budget = "" if g["budget_bytes"] is None else f", budget {format_bytes(g['budget_bytes'])}"
        lines.append(f"GPU {g['index']}  {format_bytes(g['used_bytes'])} of {format_bytes(g['total_bytes'])} in use: "
                     f"models {format_bytes(g['orion_bytes'])}, others {format_bytes(g['others_bytes'])}{budget}")
    for r in machine["rpc_servers"]:
        budget = "not asked yet" if r["budget_bytes"] is None else format_bytes(r["budget_bytes"])
        lines.append(f"RPC    {r['endpoint']}: models {format_bytes(r['orion_bytes'])}, budget {budget}")
    return Text("\n".join(lines))


def _memory_view(doc: dict):
    """Each model's memory on each device: estimate, measured, error (and where the estimate came from)."""
    from rich.table import Table

    from ..units import format_bytes

    table = Table(box=None, pad_edge=False)
    table.add_column("model", overflow="fold")
    for col in ("device", "estimate", "measured", "error", "estimate from"):
        table.add_column(col, no_wrap=True)
    for m in doc["models"]:
        source = ("its last load" if m.get("estimate_source", "estimate") != "estimate"
                  else "llama.cpp's dry run" if m.get("estimate_figures") == "llama.cpp dry run" else "the formula")
        for i, row in enumerate(m.get("memory", [])):
            measured, error = row["measured_bytes"], row["error"]
            table.add_row(m["name"] if i == 0 else "", row["device"], format_bytes(row["estimate_bytes"]),
                          "-" if measured is None else format_bytes(measured),
                          "-" if error is None else f"{error * 100:+.1f} %", source if i == 0 else "")
    return table


@json_option("Print the server's answer as JSON.")
def load(
    model: Annotated[str, typer.Argument(help="A model name, org/repo or .gguf path; encoders too (minilm).", autocompletion=model_names)],
    pin: Annotated[Optional[bool], typer.Option("--pin/--unpin", help="Keep it loaded whatever the keep-alive and the LRU order.")] = None,
    keep_alive: Annotated[Optional[str], typer.Option("--keep-alive", help="This model's keep-alive: 10m, 1h, 30s or never.", metavar="TIME")] = None,
) -> None:
    """Load a model into the running server now (optionally pinned, or with its own keep-alive)."""
    from ..server.remote import server_name
    from ..units import parse_keep_alive

    body: dict = {"model": server_name(model)}  # a path here is sent absolute (a server takes no relative one)
    if pin is not None:
        body["pin"] = pin
    if keep_alive is not None:
        parse_keep_alive(keep_alive, what="--keep-alive")  # a bad value is a usage error here, not a 400
        body["keep_alive"] = keep_alive
    doc = _client().post("/api/orion/load", body)
    out.result(doc, lambda: f"loaded {escape(doc['model'])} ({escape(doc['kind'])})" + (r" \[pinned]" if pin else ""))


def stop(model: Annotated[str, typer.Argument(help="The model to unload (as 'orion ps' names it).", autocompletion=model_names)]) -> None:
    """Unload a model from the running server."""
    _client().post("/api/orion/unload", {"model": model})
    out.text(f"unloaded {escape(model)}")
