"""The server's side of a model in its own process (:mod:`.runner`): :class:`RunnerModel` answers as a
:class:`~orion_cli.engine.model.LoadedModel` does for everything ``orion serve`` asks of a model, and
:func:`start_runner` loads one.

A native crash, an abort or a lost RPC server ends the runner, not the server: every request on it
fails with :class:`RunnerGone` (a JSON 5xx, an error event in a stream), and the callback given to
:meth:`RunnerModel.on_gone` tells the model manager, which forgets the model (the next request loads
it again). A runner that stops answering is ended by its watchdog:

- its heartbeat (every second) missing for ``ORION_RUNNER_TIMEOUT`` seconds (default
  :data:`FROZEN_S`): a stopped or wedged process;
- a model on RPC servers whose load or request hears nothing for ``ORION_RPC_TIMEOUT`` seconds
  (default :data:`RPC_TIMEOUT_S`): llama.cpp waits for an RPC server's answers without a deadline.

The runner dies with the server (``PR_SET_PDEATHSIG``), however the server dies.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import EXIT_NETWORK, EngineFault, OrionError, error_from_payload, signal_name
from .spec import LoadSpec, Timings

FROZEN_S = 15.0  # no heartbeat for this long: the runner is stopped or wedged
RPC_TIMEOUT_S = 60.0
CLOSE_S = 10.0  # a runner asked to close that has not exited by then is killed
WATCH_S = 0.25  # how often the watchdog looks
# A runner's resident memory before its model loads: the interpreter, llama_cpp and numpy (measured
# 41 MiB on Python 3.11 with llama-cpp-python 0.3.36, x86-64); the manager counts it with each model
RUNNER_BASE_BYTES = 41 * 2**20


class RunnerGone(EngineFault):
    """A model's runner process ended: a native crash, an abort, a lost RPC server, or killed."""


def seconds_env(name: str, default: float, env=None) -> float:
    """A number of seconds from the environment (above 0, at most a day); unset: ``default``."""
    import math

    from ..errors import ConfigError

    text = (env if env is not None else os.environ).get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 86400):
        raise ConfigError(f"{name} must be a number of seconds above 0, at most 86400 (not {text[:40]!r})",
                          hint=f"unset it for the default ({default:g} s)")
    return value


def rpc_timeout_s(env=None) -> float:
    """``ORION_RPC_TIMEOUT``: seconds an RPC server may stay silent before its model's runner is ended."""
    return seconds_env("ORION_RPC_TIMEOUT", RPC_TIMEOUT_S, env)


def frozen_timeout_s(env=None) -> float:
    """``ORION_RUNNER_TIMEOUT``: seconds without a runner's heartbeat before it is ended."""
    return seconds_env("ORION_RUNNER_TIMEOUT", FROZEN_S, env)


class _Pending:
    __slots__ = ("queue", "heard", "since")

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.heard = self.since = time.monotonic()


class RunnerModel:
    """A loaded model whose llama.cpp runs in a runner process (see the module's docstring)."""

    def __init__(self, spec: LoadSpec, header, *, name: str = "", frozen_s: float | None = None,
                 rpc_timeout: float | None = None) -> None:
        self.spec = spec
        self.header = header
        self.name = name or spec.path.name
        self.frozen_s = frozen_s if frozen_s is not None else frozen_timeout_s()
        self.rpc_timeout_s = rpc_timeout if rpc_timeout is not None else rpc_timeout_s()
        self.load_s = 0.0
        self.n_contexts = 1
        self.n_embd = header.n_embd if header is not None else 0
        self.has_chat_template = False
        self.is_vision = False
        self.pid = 0
        self.measured_bytes: int | None = None  # the runner's resident memory once loaded (all of it is this model's)
        self.rss_bytes = 0  # the latest the runner reported
        # its resident memory before the model loaded (the interpreter, llama.cpp's library), and what the load added
        self.base_bytes: int | None = None
        self.load_growth_bytes: int | None = None
        self.decode_steps = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._loading = _Pending()
        self._beat = self._work_heard = time.monotonic()
        self._dead: OrionError | None = None
        self._closing = False
        self._kill_reason = ""
        self._on_gone: list[Callable[[str], None]] = []
        self._stderr: deque[str] = deque(maxlen=20)
        self._gone_event = threading.Event()
        self._start()

    # ------------------------------------------------------------ the process

    def _start(self) -> None:
        from .._debug import debug_enabled
        from .._proc import popen_dying_with_process
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        try:
            # started from a thread that lives as long as the server: PR_SET_PDEATHSIG follows the
            # forking thread, and a worker thread that ends when idle would take the runner with it
            self._proc = popen_dying_with_process(
                [sys.executable, "-m", "orion_cli.engine.runner", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, cwd="/")
        finally:
            theirs.close()
        self.pid = self._proc.pid
        self._conn = Connection(ours.detach())
        self._debug = debug_enabled()
        for target, what in ((self._read, "reader"), (self._read_stderr, "stderr"), (self._watch, "watchdog")):
            threading.Thread(target=target, name=f"orion-runner-{what}-{self.pid}", daemon=True).start()

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            now = time.monotonic()
            self._beat = now
            head = message[0]
            if head == "beat":
                info = message[1]
                self.decode_steps = max(self.decode_steps, info.get("steps", 0))
                self.rss_bytes = info.get("rss", 0)
            elif head in ("progress", "loaded", "failed"):
                self._loading.heard = now
                self._loading.queue.put(message)
            elif head == "closed":
                pass
            else:
                self._work_heard = now
                with self._lock:
                    pending = self._pending.get(head)
                if pending is not None:
                    pending.heard = now
                    pending.queue.put(message[1:])
        self._ended()

    def _read_stderr(self) -> None:
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr.append(line)
                if self._debug:
                    sys.stderr.write(f"[runner {self.pid}] {line}\n")

    def _watch(self) -> None:
        while not self._gone_event.wait(WATCH_S):
            now = time.monotonic()
            if now - self._beat > self.frozen_s:
                self._kill(f"stopped answering (no heartbeat for {now - self._beat:.0f} s)")
                return
            if self.spec.rpc_servers:
                # silent: since the runner last answered any request, or since the oldest request
                # began if that is later (a runner idle for an hour was not silent then)
                with self._lock:
                    oldest = min((p.since for p in self._pending.values()), default=None)
                silent = 0.0
                if oldest is not None:
                    silent = now - max(self._work_heard, oldest)
                if self.measured_bytes is None:
                    silent = max(silent, now - self._loading.heard)
                if silent > self.rpc_timeout_s:
                    servers = ", ".join(self.spec.rpc_servers)
                    self._kill(f"got no answer for {silent:.0f} s (RPC server {servers}; ORION_RPC_TIMEOUT is "
                               f"{self.rpc_timeout_s:g} s)")
                    return

    def _kill(self, reason: str) -> None:
        if not self._kill_reason:
            self._kill_reason = reason
        try:
            self._proc.kill()
        except OSError:
            pass

    def _why(self, returncode: int) -> str:
        if self._kill_reason:
            return self._kill_reason
        last = next((line for line in reversed(self._stderr) if line.startswith("error:")), "")
        if not last:
            last = self._stderr[-1] if self._stderr else ""
        if returncode < 0:
            name = signal_name(returncode)
            if name == "SIGKILL":
                return "was killed (SIGKILL: the system may have run out of memory)"
            return f"crashed in llama.cpp ({name})" + (f": {last}" if last else "")
        if returncode == EXIT_NETWORK and last:
            return "lost an RPC server: " + last.removeprefix("error:").strip()
        return f"exited (code {returncode})" + (f": {last}" if last else "")

    def _ended(self) -> None:
        """The connection closed: the runner exited (or is made to). Every request on it fails."""
        try:
            returncode = self._proc.wait(timeout=CLOSE_S)
        except subprocess.TimeoutExpired:
            self._kill("closed its connection but did not exit")
            returncode = self._proc.wait()
        if self._closing and not self._kill_reason:
            from .decoder import ModelUnloaded

            error: OrionError = ModelUnloaded("the model was unloaded", hint="send the request again: it is loaded anew")
            reason = ""
        else:
            reason = self._why(returncode)
            error = RunnerGone(f"{self.name}'s runner {reason}",
                               hint="send the request again: the model is loaded anew")
        self._dead = error
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            callbacks = list(self._on_gone) if reason else []
        for p in pending:
            p.queue.put(("error", error))
        self._loading.queue.put(("failed", error))
        self._gone_event.set()
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - the manager's bookkeeping must not stop the others
                pass

    def on_gone(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once if the runner ends other than by :meth:`close` (at once if it has)."""
        with self._lock:
            if not self._gone_event.is_set():
                self._on_gone.append(callback)
                return
        if isinstance(self._dead, RunnerGone):
            callback(self._dead.message)

    @property
    def alive(self) -> bool:
        return not self._gone_event.is_set()

    # ------------------------------------------------------------ loading

    def load(self, check, *, progress: Callable[[float], None] | None = None,
             cancel: threading.Event | None = None) -> "RunnerModel":
        """Load the model in the runner; ``cancel`` (set) ends the runner and raises LoadCancelled."""
        from .loader import LoadCancelled

        try:
            self._send(("load", self.spec, check))
        except OSError:
            pass  # it is gone: its exit is read below
        while True:
            try:
                message = self._loading.queue.get(timeout=WATCH_S)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    self._closing = True
                    self._kill("")
                    raise LoadCancelled(f"loading {self.spec.path.name} was cancelled")
                continue
            head, value = message
            if head == "progress":
                if progress:
                    progress(value)
            elif head == "loaded":
                self.load_s = value["load_s"]
                self.n_contexts = value["n_contexts"]
                self.n_embd = value["n_embd"]
                self.has_chat_template = value["has_chat_template"]
                self.is_vision = value["is_vision"]
                self.measured_bytes = value["rss_after"]
                self.rss_bytes = value["rss_after"]
                self.base_bytes = value["rss_before"]
                self.load_growth_bytes = max(0, value["rss_after"] - value["rss_before"])
                return self
            else:  # failed: its own error, or the runner's end
                self.close()
                raise value if isinstance(value, BaseException) else error_from_payload(value)

    # ------------------------------------------------------------ requests

    def _request(self, *message) -> tuple[int, _Pending]:
        rid = next(self._ids)
        pending = _Pending()
        with self._lock:
            if self._dead is not None:
                raise type(self._dead)(self._dead.message, hint=self._dead.hint)
            self._pending[rid] = pending
        try:
            self._send((message[0], rid, *message[1:]))
        except OSError:  # the runner is gone; its end fails this request
            pass
        return rid, pending

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    @staticmethod
    def _raise(value) -> None:
        raise value if isinstance(value, BaseException) else error_from_payload(value)

    def _call(self, method: str, *args, **kwargs) -> Any:
        rid, pending = self._request("call", method, args, kwargs)
        try:
            head, value = pending.queue.get()  # the watchdog or the runner's end answers if it does not
        finally:
            self._forget(rid)
        if head == "error":
            self._raise(value)
        return value

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self._call("tokenize", text, special=special)

    def tokenize_many(self, texts: Sequence[str], *, special: bool = True) -> list[list[int]]:
        return self._call("tokenize_many", list(texts), special=special)

    def count_tokens(self, text: str) -> int:
        return self._call("count_tokens", text)

    def chat_mode(self, prompt: str, system: str | None, history: Sequence[dict], chat: bool | None):
        """Answered here (the rule needs only what the runner said at its load)."""
        from ..messages import chat_mode

        return chat_mode(self.has_chat_template, self.is_vision, prompt, system, history, chat)

    def chat_format(self, system: str | None, history: Sequence[dict], chat: bool | None) -> str:
        from ..messages import chat_format

        architecture = self.header.architecture if self.header is not None else "unknown"
        return chat_format(self.has_chat_template, self.is_vision, architecture, system, history, chat)

    def prompt_tokens(self, prompt: str | None, *, system: str | None = None, history: Sequence[dict] = (),
                      chat: bool | None = None, tools: list[dict] | None = None) -> tuple[list[int], list[str]]:
        return self._call("prompt_tokens", prompt, system=system, history=list(history), chat=chat, tools=tools)

    def embed_tokens(self, sequences: Sequence[Sequence[int]]):
        return self._call("embed_tokens", [list(s) for s in sequences])

    def grammar_for(self, response_format: dict | None) -> str | None:
        return self._call("grammar_for", response_format)

    def decoder(self) -> "_RunnerDecoder":
        return _RunnerDecoder(self)

    def generate_tokens(self, tokens: Sequence[int], *, timings: Timings | None = None,
                        cancel: threading.Event | None = None, records: list | None = None,
                        **options) -> Iterator[str]:
        """The text of one sequence, as :meth:`ParallelDecoder.generate` streams it (``options`` go to
        the runner's :meth:`ParallelDecoder.submit`; each token's record comes back with its bytes)."""
        import codecs

        t = timings if timings is not None else Timings()
        t.prompt_tokens = len(tokens)
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # pieces come as each token's bytes
        start = time.perf_counter()
        first = 0.0
        pieces = 0
        rid, pending = self._request("generate", list(tokens), options)
        ended = False
        try:
            while True:
                try:
                    head, value = pending.queue.get(timeout=WATCH_S if cancel is not None else None)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        self._cancel(rid)
                        cancel = None  # told once; the runner ends the sequence at its next step
                    continue
                if head == "piece":
                    if not first:
                        first = time.perf_counter()
                    pieces += 1
                    if isinstance(value, tuple):  # (its bytes, its record): logprobs were asked for
                        value, record = value
                        if records is not None:
                            records.append(record)
                    text = decode.decode(value)
                    if text:
                        yield text
                elif head == "end":
                    ended = True
                    t.prompt_s, t.gen_tokens, t.gen_s = value["prompt_s"], value["gen_tokens"], value["gen_s"]
                    t.hit_limit = value["hit_limit"]
                    t.cached_tokens = value.get("cached_tokens", 0)
                    self.decode_steps = max(self.decode_steps, value["steps"])
                    tail = decode.decode(b"", final=True)
                    if tail:
                        yield tail
                    return
                else:
                    ended = True
                    self._raise(value)
        finally:
            self._forget(rid)
            if not ended:  # closed early (a stop string, a client gone): the runner stops it
                self._cancel(rid)
                end = time.perf_counter()
                t.prompt_s = (first or end) - start
                t.gen_tokens = max(0, pieces - 1)
                t.gen_s = end - (first or end)

    def _cancel(self, rid: int) -> None:
        try:
            self._send(("cancel", rid))
        except OSError:
            pass

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        """Unload: the runner closes the model and exits (killed if it has not within CLOSE_S)."""
        self._closing = True
        if self.alive:
            try:
                self._send(("close",))
            except OSError:
                pass
            if not self._gone_event.wait(CLOSE_S):
                self._kill(f"did not close within {CLOSE_S:g} s")
                self._gone_event.wait(CLOSE_S)
        try:
            self._conn.close()
        except OSError:
            pass

    def kill(self) -> None:
        """End the runner now (SIGKILL): tests and the watchdog."""
        self._kill("")


class _RunnerDecoder:
    """What :meth:`LoadedModel.decoder` gives, for a runner: its ``generate``."""

    def __init__(self, model: RunnerModel) -> None:
        self.model = model

    def generate(self, tokens: Sequence[int], **kwargs) -> Iterator[str]:
        return self.model.generate_tokens(tokens, **kwargs)


def start_runner(spec: LoadSpec, *, check=None, progress: Callable[[float], None] | None = None,
                 cancel: threading.Event | None = None, name: str = "") -> RunnerModel:
    """A runner process with ``spec`` loaded in it (validated here first: a malformed file never
    reaches a runner either)."""
    from ..enginecheck import current_check
    from .loader import validate

    header = validate(Path(spec.path))
    if spec.projector is not None:
        validate(spec.projector)
    model = RunnerModel(spec, header, name=name)
    return model.load(check or current_check(), progress=progress, cancel=cancel)
