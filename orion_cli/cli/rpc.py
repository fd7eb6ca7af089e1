"""``orion rpc-server``: lend this machine's memory (and GPUs) to an orion on another machine."""

from __future__ import annotations

from typing import Annotated

import typer

from ._options import ThreadsOpt, json_option
from ._output import escape, examples, out

EXAMPLES = examples(
    ("orion rpc-server", "serve this machine on 127.0.0.1:50052 (loopback only)"),
    ("orion rpc-server --host 192.168.1.20", "serve the LAN (no authentication: trusted networks only)"),
    ("orion run big-model --rpc 192.168.1.20:50052", "on the other machine: layers go here"),
    ("orion run big-model --rpc 192.168.1.20:50052=6GB", "and at most 6 GB of them"),
)


@json_option("Print one JSON line when ready (endpoint, devices, memory), then one per client event.")
def rpc_server(
    host: Annotated[str, typer.Option(help="The address to listen on. Anything but loopback exposes this machine: llama.cpp's RPC protocol has no authentication.", metavar="ADDR")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The TCP port to listen on.", metavar="N")] = 50052,
    threads: ThreadsOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print each client connection (a load makes several).")] = False,
) -> None:
    """Serve this machine's CPU (or its GPUs) to orion on other machines, over llama.cpp's RPC backend.

    Another machine then runs a model that fits neither alone with
    'orion run MODEL --rpc HOST:PORT': orion there sizes the split from this
    machine's free memory (or HOST:PORT=SIZE). The server takes one client at a
    time and keeps nothing on disk; Ctrl-C stops it.
    """
    import sys
    import time

    from .._debug import debug_enabled
    from .._net import is_loopback
    from ..engine import rpc_supported
    from ..errors import InvalidValue
    from ..rpc import RpcServerFailed, check_port_free, server_events, start_server, wait_ready
    from ..rpc_endpoints import RpcServer, rpc_unsupported
    from ..strategy import load_strategy
    from ..units import format_bytes

    if not 0 < port < 65536:
        raise InvalidValue(f"--port {port} is not a TCP port", hint="a number from 1 to 65535, such as 50052")
    strategy = load_strategy({"threads": threads})
    if not rpc_supported():
        raise rpc_unsupported()
    if not is_loopback(host):
        out.warning(f"listening on {host}: llama.cpp's RPC protocol has no authentication or encryption; anyone "
                    "who reaches this port can run code on this machine's memory. Use it on a trusted network only.")
    check_port_free(host, port)
    server = RpcServer(host, port)
    proc = start_server(host, port, strategy.threads, debug=debug_enabled())
    try:
        memory = wait_ready(server, proc)
        devices = [{"free_bytes": free, "total_bytes": total} for free, total in memory.devices]
        protocol = ".".join(map(str, memory.version))
        kinds = " + ".join(f"{format_bytes(free)} free of {format_bytes(total)}" for free, total in memory.devices)
        out.event({"event": "ready", "endpoint": server.endpoint, "threads": strategy.threads, "protocol": protocol,
                   "devices": devices},
                  f"orion rpc-server on [bold]{escape(server.endpoint)}[/]: {len(devices)} device"
                  f"{'s' if len(devices) > 1 else ''} ({kinds}), {strategy.threads} threads, RPC protocol "
                  f"{protocol}. Ctrl-C stops it.")
        out.text(f"[dim]on the other machine: orion run MODEL --rpc {escape(server.endpoint)}[/]")
        for event in server_events(proc.stdout):
            if (event.startswith("client") and (verbose or out.json)) or debug_enabled():
                stamp = time.strftime("%H:%M:%S")
                out.event({"event": event, "time": stamp}, f"[dim]{stamp}[/] {escape(event)}")
        code = proc.wait()
        reported = proc.orion_errors.error()
        if reported is not None:
            raise reported
        raise RpcServerFailed(f"llama.cpp's RPC server stopped on its own (exit status {code})",
                              hint="run with --debug for llama.cpp's log")
    except KeyboardInterrupt:
        from ._output import err_console

        err_console().print("stopped")
        sys.stdout.flush()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a server that ignores SIGTERM
                proc.kill()
