"""``orion serve``: one long-lived process that owns the models and the shared encoder.

- :mod:`.state`: the model manager, the models clients named, the shared encoders;
  :mod:`.scheduler`: per-model queues, leases given back exactly once, the embedding batcher;
  :mod:`.events` and :mod:`.metrics`: the manager's events, ``/api/orion/ps`` and ``/metrics``;
- :mod:`.app`: the HTTP routes (OpenAI-compatible under ``/v1``, Ollama's under ``/api``, orion's
  management API under ``/api/orion``), thin over :mod:`.openai` and :mod:`.ollama` (request
  parsing, response documents), :mod:`.streaming` (server-sent events, NDJSON) and
  :mod:`.http_errors` (the one table of errors, shared with the client);
- :mod:`.http_limits`: deadlines for a request's headers and body, idle connections, the
  connection limit (uvicorn's h11 protocol, subclassed);
- :mod:`.discovery` and :mod:`.client`: how the CLI finds a running server and talks to it
  (standard library only, so the CLI's start-up stays fast).

:func:`serve` takes ``$ORION_HOME/server.lock`` (one server per home), binds, writes
``$ORION_HOME/server.json``, serves until SIGINT/SIGTERM, then stops
accepting, finishes in-flight requests within ``grace_s`` (those still generating after it are
stopped, their models unloaded under them, and answered an error), unloads, removes the file.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from typing import Callable

from .._net import is_loopback
from ..errors import OrionError


class ServerAlreadyRunning(OrionError):
    exit_code = 1


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket says it is TCP; without it every reply on a kept-alive connection waited ~40 ms (Nagle's
    # algorithm against the client's delayed ACK), and OpenAI's client and LangChain keep connections
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        from ..errors import InvalidValue

        raise InvalidValue(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           hint="choose another --port (0 picks a free one)") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


# After the grace period: ABORT_S for the streams stopped then to send their error event (their models
# are unloaded under them), then those still open are cut, and CUT_S later uvicorn cancels what is left.
ABORT_S = 1.0
CUT_S = 1.0


def _limits(grace_s, header_s, body_s, idle_s, max_connections):
    """The HTTP limits: each argument given, else its environment variable, else its default."""
    from dataclasses import replace

    from .http_limits import HTTPLimits, limits_from_env

    given = {"grace_s": grace_s, "header_s": header_s, "body_s": body_s, "idle_s": idle_s,
             "max_connections": max_connections}
    return replace(limits_from_env(HTTPLimits()), **{k: v for k, v in given.items() if v is not None})


def _few_malloc_arenas(arenas: int = 2) -> None:
    """Keep glibc to a couple of malloc arenas: with one per worker thread (up to 8 per core),
    memory freed after a model is unloaded stays scattered across arenas and is not given back
    (measured: +61 MiB of RSS after a 500-request load test and unloading everything)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
        except (OSError, AttributeError):  # not glibc
            pass


def _claim_home():
    """This ORION_HOME's one server is this process: its ``server.lock`` taken (held until the lock
    is closed, or the process ends however it ends), before anything binds or loads. A second server
    gets :class:`ServerAlreadyRunning` naming the first; a ``server.json`` that is not a regular
    file of this user's (a FIFO, a link, a folder...) is refused, never replaced."""
    from .._proc import alive
    from . import discovery

    hint = "use it, or stop it first (Ctrl-C, or kill that pid)"
    try:
        lock = discovery.lock_home()
    except discovery.HomeLocked as held:
        first = discovery.check_server_file().info
        where = first.url if first is not None and first.pid == held.pid else "starting"
        who = f"pid {held.pid}, {where}" if held.pid else "starting"
        raise ServerAlreadyRunning(f"orion serve is already running for this ORION_HOME ({who})", hint=hint) from None
    running = discovery.check_server_file().info  # an orion from before the lock: its pid answers /health
    if running is not None and running.pid > 0 and alive(running.pid):
        try:
            doc = discovery.health_doc(running)
        except discovery.NoAnswer:
            doc = None
        if isinstance(doc, dict) and doc.get("pid") == running.pid:
            lock.close()
            raise ServerAlreadyRunning(f"orion serve is already running for this ORION_HOME (pid {running.pid}, "
                                       f"{running.url})", hint=hint)
    problem = discovery.replaceable_problem()
    if problem is not None:
        lock.close()
        raise OrionError(f"{discovery.server_file()} is {problem}, not orion's discovery file",
                         hint="remove it (orion serve writes a regular file there), then start again")
    return lock


def console(write: Callable[[str], None] | None = None) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """(say, log) over ``write`` (default: stderr): ``say`` one console line, ``log`` a report of
    several lines (a traceback); both through :func:`orion_cli._text.printable`, so a name from a
    client, a registry or a file (or an error message quoting one) cannot put an escape sequence on
    the server's console, nor ``say`` a line that looks like another."""
    from .._text import printable

    write = write or (lambda line: print(line, file=sys.stderr, flush=True))

    def say(line: str) -> None:
        write(printable(line, one_line=True))

    def log(text: str) -> None:
        write(printable(text))

    return say, log


def serve(strategy, *, host: str = "127.0.0.1", port: int = 11435, api_key: str | None = None,
          max_queue: int = 8, parallel: int = 4, grace_s: float | None = None,
          header_timeout_s: float | None = None, body_timeout_s: float | None = None,
          idle_timeout_s: float | None = None, max_connections: int | None = None,
          say: Callable[[str], None] | None = None, access=None) -> None:
    """Run the server in this process until SIGINT or SIGTERM. ``access``: the models clients may
    name (a :class:`.access.ModelAccess`; default: only those registered here).

    The HTTP limits (:mod:`.http_limits`; None: its environment variable, else its default): a
    request's headers within ``header_timeout_s`` (10 s), its body within ``body_timeout_s`` (30 s),
    an idle connection closed after ``idle_timeout_s`` (5 s), requests past ``max_connections``
    (1000) answered 503; at SIGINT/SIGTERM in-flight requests get ``grace_s`` (10 s) to finish, then
    the models are unloaded (the generations still running end with an error)."""
    import uvicorn

    from .._fs import now_iso
    from .app import create_app
    from .discovery import ServerInfo, remove_server_file, write_server_file
    from .state import ServerState

    say, log = console(say)
    limits = _limits(grace_s, header_timeout_s, body_timeout_s, idle_timeout_s, max_connections)  # a bad one: now
    home_lock = _claim_home()  # held for the server's life (closed below, or by the kernel with the process)
    sock = None
    try:
        if not is_loopback(host) and not api_key:
            say(f"warning: listening on {host} without an API key: anyone who can reach this machine can use "
                "its models (pass --api-key or set ORION_API_KEY)")
        _few_malloc_arenas()
        sock = bind(host, port)
        port = sock.getsockname()[1]
        state = ServerState(strategy, max_queue=max_queue, parallel=parallel, on_line=say, access=access)
    except BaseException:  # it did not start: the home is free again at once (not when the process ends)
        if sock is not None:
            sock.close()
        home_lock.close()
        raise
    app = create_app(state, api_key=api_key, log=log)
    state.sample_memory()  # the dashboard's memory chart: a sample every few seconds, until stopping
    info = ServerInfo(host, port, os.getpid(), now_iso(), auth=bool(api_key))
    from .http_limits import connection_limit, give_up, protocol_class

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=limits.grace_s + ABORT_S + CUT_S, http=protocol_class(limits),
                            timeout_keep_alive=limits.idle_s,
                            limit_concurrency=connection_limit(limits.max_connections))
    aborts: list[threading.Thread] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # first signal: stop accepting, drain, then exit
            state.stopping.set()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            connections = self.server_state.connections

            def abort() -> None:  # the grace period is over: 503 to what is still worked on, models unloaded
                give_up(connections, streams=False)
                aborts.append(threading.Thread(target=state.close, name="orion-abort", daemon=True))
                aborts[-1].start()

            loop = asyncio.get_running_loop()
            timers = [loop.call_later(limits.grace_s, abort),
                      loop.call_later(limits.grace_s + ABORT_S, lambda: give_up(connections, streams=True))]
            try:
                await super().shutdown(sockets)
            finally:
                for timer in timers:
                    timer.cancel()

    server = Server(config)
    # uvicorn handles SIGINT/SIGTERM while it runs (stop accepting, drain), then restores the
    # handlers it found and raises the signal again: these take it, so the clean-up below runs
    # and the process exits 0 instead of dying by the signal (or a KeyboardInterrupt). Installed
    # before server.json is written and the server announced: a client (or a test) that signals
    # the moment it reads that line gets a clean stop, not a process killed by the signal with
    # its server.json left behind.
    import signal

    def stop_soon(*_) -> None:  # also a signal before uvicorn installed its handlers: exit at once
        state.stopping.set()
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop_soon) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        write_server_file(info)
        say(f"orion serve on {info.url} (pid {info.pid}); OpenAI API at {info.url}/v1"
            f"{', API key required' if api_key else ''}. Ctrl-C stops it.")
        server.run(sockets=[sock])
    finally:
        state.stopping.set()
        say("stopping: unloading models")
        for thread in aborts:
            thread.join()
        state.close()
        remove_server_file(info.pid)
        home_lock.close()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if server.started is False:
        raise OrionError("the server did not start", hint="run with --debug for the reason")


__all__ = ["serve", "is_loopback", "ServerAlreadyRunning"]
