"""A model in a process of its own, as ollama runs llama.cpp: ``python -m orion_cli.engine.runner FD``.

The server's side is :class:`orion_cli.engine.runner_model.RunnerModel`; this is the child's. It
loads one model (:func:`orion_cli.engine.load`) and answers requests for it over a connection (the
file descriptor ``FD``: one end of a socket pair, :mod:`multiprocessing.connection` messages), one
thread a request, so a generation streams while others run beside it in the model's one decoder. A
native crash, an abort, or a lost RPC server ends this process, never the server.

Messages to the runner: ``("load", spec, check)`` first, then ``("call", id, method, args, kwargs)``
for the methods in :data:`CALLS`, ``("generate", id, tokens, options)``, ``("cancel", id)`` and
``("close",)``. From it: ``("progress", fraction)`` while it loads, then ``("loaded", info)`` or
``("failed", error)``; ``(id, "ok", result)``, ``(id, "error", error)``, ``(id, "piece", bytes)`` (a
token's; with logprobs ``(bytes, record)``, :func:`~.sampling.token_record`'s), ``(id, "end", timings)``; and ``("beat", info)`` every second (the parent's watchdog reads them).
Errors travel as :func:`orion_cli.errors.error_payload` dicts.
"""

from __future__ import annotations

import os
import sys
import threading
import time

# What a client may call on the loaded model (nothing else is reachable through the connection).
CALLS = frozenset({"tokenize", "tokenize_many", "count_tokens", "prompt_tokens", "embed_tokens", "chat_mode",
                   "grammar_for"})
BEAT_S = 1.0


def _payload(exc: BaseException) -> dict:
    from ..errors import OrionError, error_payload

    if isinstance(exc, OrionError):
        return error_payload(exc)
    return {"error": f"{type(exc).__name__}: {exc}", "hint": "run the server with --debug for the details",
            "class": "EngineFault"}


class _Runner:
    def __init__(self, conn) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._cancels: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.model = None
        self.busy = 0  # requests being answered now

    def send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    # ------------------------------------------------------------ loading

    def load(self, spec, check) -> bool:
        from ..device import process_memory_bytes
        from ._binding import load_library
        from .loader import load

        load_library()  # resident before the measure: rss_after - rss_before is the model's own
        before = process_memory_bytes()
        last = [0.0]

        def progress(value: float) -> None:  # a load over RPC may take long: the parent sees it move
            now = time.monotonic()
            if now - last[0] >= 0.2 or value >= 1.0:
                last[0] = now
                self.send(("progress", float(value)))

        try:
            self.model = load(spec, check=check, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - the parent raises it as its own class
            self.send(("failed", _payload(exc)))
            return False
        model = self.model
        self.send(("loaded", {
            "load_s": model.load_s, "n_contexts": model.n_contexts, "n_embd": model.n_embd,
            "has_chat_template": model.has_chat_template, "is_vision": model.is_vision,
            "rss_before": before, "rss_after": process_memory_bytes(), "pid": os.getpid()}))
        return True

    # ------------------------------------------------------------ requests

    def _call(self, rid: int, method: str, args, kwargs) -> None:
        try:
            if method not in CALLS:
                raise ValueError(f"no such call: {method}")
            result = getattr(self.model, method)(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the caller's error
            self.send((rid, "error", _payload(exc)))
        else:
            self.send((rid, "ok", result))
        finally:
            self._done()

    def _generate(self, rid: int, tokens, options: dict, cancel: threading.Event) -> None:
        """Queue the sequence in the model's decoder; its loop sends each token's bytes straight to
        the server from its own thread (no thread in between: measured, a hop a token cost ~3 % of
        one client's tokens per second), then the end with the timings."""
        runner = self
        submitted = threading.Event()
        box: list = []

        class Sink:
            def put(self, item) -> None:
                if isinstance(item, (bytes, tuple)):  # a token's bytes (and its record, with logprobs)
                    runner.send((rid, "piece", item))
                    return
                submitted.wait()  # (the loop may end a sequence before submit() has returned it)
                try:
                    if item is None:
                        from .spec import Timings

                        t = Timings()
                        box[0].fill(t)
                        runner.send((rid, "end", {"prompt_s": t.prompt_s, "gen_tokens": t.gen_tokens,
                                                  "gen_s": t.gen_s, "hit_limit": t.hit_limit,
                                                  "cached_tokens": t.cached_tokens,
                                                  "steps": runner.model.decode_steps}))
                    else:
                        runner.send((rid, "error", _payload(item)))
                except (OSError, EOFError, ValueError):
                    pass  # the server is gone
                finally:
                    runner._finished(rid)

        with self._lock:
            self.busy += 1
        try:
            box.append(self.model.decoder().submit(tokens, Sink(), cancel=cancel, **options))
        except BaseException as exc:  # noqa: BLE001 - refused before it was queued (empty, too long)
            self.send((rid, "error", _payload(exc)))
            self._finished(rid)
            return
        submitted.set()

    def _finished(self, rid: int) -> None:
        with self._lock:
            self._cancels.pop(rid, None)
            self.busy -= 1

    def _done(self) -> None:
        with self._lock:
            self.busy -= 1

    def _start(self, target, *args) -> None:
        with self._lock:
            self.busy += 1
        threading.Thread(target=target, args=args, daemon=True).start()

    def _beat(self) -> None:
        from ..device import process_memory_bytes

        while True:
            time.sleep(BEAT_S)  # a heartbeat, not a synchronisation: the parent only reads its age
            model = self.model
            try:
                self.send(("beat", {"steps": model.decode_steps if model is not None else 0,
                                    "rss": process_memory_bytes(), "busy": self.busy}))
            except (OSError, EOFError, ValueError):
                return

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: so is this runner
                return
            kind = message[0]
            if kind == "call":
                _, rid, method, args, kwargs = message
                self._start(self._call, rid, method, args, kwargs)
            elif kind == "generate":
                _, rid, tokens, options = message
                cancel = threading.Event()
                with self._lock:
                    self._cancels[rid] = cancel
                self._generate(rid, tokens, options, cancel)
            elif kind == "cancel":
                with self._lock:
                    cancel = self._cancels.get(message[1])
                if cancel is not None:
                    cancel.set()
            elif kind == "close":
                return


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(int(argv[0]))
    runner = _Runner(conn)
    # the heartbeat from the start: a load that takes long is not a runner that stopped answering
    threading.Thread(target=runner._beat, name="orion-runner-beat", daemon=True).start()
    try:
        message = conn.recv()
    except (EOFError, OSError):
        os._exit(0)
    if message[0] == "load" and runner.load(message[1], message[2]):
        runner.serve()
        try:
            runner.model.close()  # its decoder's thread ends, its contexts are freed
            runner.send(("closed",))
        except BaseException:  # noqa: BLE001 - ending anyway; the parent sees the exit
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)  # no interpreter teardown under llama.cpp's threads


if __name__ == "__main__":
    main(sys.argv[1:])
