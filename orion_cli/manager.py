"""The model manager: every loaded model, under a cap, a memory budget and a keep-alive.

One object used by ``run`` (and later ``embed`` and ``serve``):

- loaded models in LRU order of use; at most ``max_models`` at once;
- before loading, the model's memory estimate is checked against the budget:
  least-recently-used idle models are evicted until it fits, and a model that
  can never fit is refused with :class:`ModelDoesNotFit`, saying what would;
- a model unused for ``keep_alive_s`` is unloaded (``None``: never), by a
  background timer in long-running processes;
- ``pin`` keeps a model from eviction and keep-alive; events (loading, loaded,
  evicted, unloaded, refused, cancelled, failed, gone) go to a callback;
- a model that ends by itself (its runner process crashed: :meth:`gone`) is forgotten at once;
- a probe measures what each load took on each device (:mod:`.measure`): the budget counts that, and the
  memory ledger (:mod:`.ledger`) records it as the estimate of the model's next load.

The clock, the memory probes and the loader are injected, so the policy is
tested without sleeping and without loading real models.

A model is closed outside the manager's lock (as ollama's scheduler unloads a runner outside the
lock that admits requests): closing may wait for a decoder thread, and requests for the other
loaded models go on meanwhile. A model being closed still counts against the budget until it is
gone; a load that needs room waits for it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from . import ledger
from .errors import DoesNotFit, ModelInUse, OrionError
from .manager_types import Entry, Event, ManagerStatus, Request
from .units import format_bytes

__all__ = ["Entry", "Event", "ManagerClosed", "ManagerStatus", "ModelDoesNotFit", "ModelManager", "Request"]


class ModelDoesNotFit(DoesNotFit):
    """A model whose estimate can never fit the budget, even with everything else unloaded."""


class ManagerClosed(OrionError):
    """A model asked for while the manager shuts down."""


class _WaitForLoads(Exception):
    """No room now, but other models are loading: their loads end (and their memory is known to be in
    use, or free again) before this request is refused."""


class ModelManager:
    def __init__(
        self,
        *,
        max_models: int,
        budget_bytes: int,
        keep_alive_s: int | None,
        clock: Callable[[], float] = time.monotonic,
        available_memory: Callable[[], int] | None = None,
        on_event: Callable[[Event], None] | None = None,
        timer: bool = False,
        gpu_budget_bytes: int | None = None,
        events_kept: int = 1000,
        gpu_budgets: Sequence[int] | None = None,
        probe: Callable[[Request, Callable[[], Any]], tuple[Any, "ledger.Measured | None"]] | None = None,
        memory_ledger: "ledger.MemoryLedger | None" = None,
    ) -> None:
        """``probe(request, load)`` loads and returns the model and what it measured (:mod:`.measure`);
        ``memory_ledger``: where measures are recorded and next loads' estimates read (None: none).
        ``gpu_budgets``: each GPU's budget, by index (its sum is ``gpu_budget_bytes`` unless that is
        given): a request's part on each GPU must fit that GPU's budget beside what is loaded there, and
        a model is evicted for it only if it holds memory on the GPU that lacks it."""
        self.max_models = max_models
        self.budget_bytes = budget_bytes
        self.gpu_budgets = tuple(gpu_budgets) if gpu_budgets else ()
        if gpu_budget_bytes is None and self.gpu_budgets:
            gpu_budget_bytes = sum(self.gpu_budgets)
        self.gpu_budget_bytes = gpu_budget_bytes  # None: no GPU
        self.keep_alive_s = keep_alive_s
        self._clock = clock
        self._available = available_memory
        self._on_event = on_event
        self._probe = probe
        self.ledger = memory_ledger
        self._entries: dict[str, Entry] = {}  # insertion order = LRU order (oldest first)
        self._loading: dict[str, threading.Event] = {}  # key -> cancel event
        # what is loading now, counted against the budget: loads run side by side (no lock across them)
        self._loading_requests: dict[str, Request] = {}
        self._closing: dict[str, Entry] = {}  # taken out of use, being closed outside the lock
        self._cond = threading.Condition(threading.RLock())
        self.events: deque[Event] = deque(maxlen=events_kept)  # the latest (a long-lived server keeps no more)
        self._stop = threading.Event()
        self._closed = False  # close() was called: no more loads
        self._timer: threading.Thread | None = None
        if timer:
            self._timer = threading.Thread(target=self._timer_loop, name="orion-keep-alive", daemon=True)
            self._timer.start()

    # ------------------------------------------------------------ events

    def _emit(self, kind: str, key: str, detail: str = "") -> None:
        event = Event(kind, key, detail, self._clock())
        self.events.append(event)
        if self._on_event:
            self._on_event(event)

    # ------------------------------------------------------------ use

    @contextmanager
    def use(self, request: Request) -> Iterator[Any]:
        """The loaded model for ``request`` (loading it if needed), marked in use meanwhile."""
        entry = self._acquire(request)
        try:
            yield entry.model
        finally:
            with self._cond:
                entry.users -= 1
                entry.last_used = self._clock()
                self._cond.notify_all()

    def _acquire(self, request: Request) -> Entry:
        if self.ledger is not None and request.ledger_key and request.key not in self._entries:
            # its last load's measure is its estimate (read outside the lock: a file, if it changed)
            request = ledger.recorded_estimate(request, self.ledger.get(request.ledger_key))
        with self._cond:
            while True:
                if self._closed:
                    raise ManagerClosed("the model manager is shutting down", hint="try again once it is up")
                entry = self._entries.get(request.key)
                if entry is not None:
                    self._entries.pop(request.key)
                    self._entries[request.key] = entry  # most recently used
                    entry.users += 1
                    entry.last_used = self._clock()
                    return entry
                if request.key not in self._loading and not self._closing:
                    try:
                        victims = self._make_room(request)
                        break
                    except _WaitForLoads:
                        pass  # what is loading now decides whether this fits: wait for it
                # another thread is loading it (share that load), models are being closed (their
                # memory is not free yet), or others are loading and it does not fit beside them
                self._cond.wait()
            cancel = threading.Event()
            self._loading[request.key] = cancel
            self._loading_requests[request.key] = request
        try:
            self._close(victims)
        except BaseException:  # a victim's close failed: this load never began
            with self._cond:
                self._loading.pop(request.key, None)
                self._loading_requests.pop(request.key, None)
                self._cond.notify_all()
            raise
        try:
            self._emit("loading", request.key, ledger.loading_detail(request))
            if self._probe is not None:
                model, measured = self._probe(request, lambda: request.load(cancel))
            else:
                model, measured = request.load(cancel), None
        except BaseException as exc:
            with self._cond:
                self._loading.pop(request.key, None)
                self._loading_requests.pop(request.key, None)
                self._cond.notify_all()
                self._emit("cancelled" if cancel.is_set() else "failed", request.key, str(exc))
            raise
        with self._cond:
            self._loading.pop(request.key, None)
            self._loading_requests.pop(request.key, None)
            if self._closed:  # shut down while it loaded: nobody will close it later
                self._cond.notify_all()
                model.close()
                raise ManagerClosed("the model manager is shutting down", hint="try again once it is up")
            now = self._clock()
            memory = ledger.ModelMemory.of(request, measured)
            entry = Entry(request.key, request.name, model, request.estimate_bytes, now, now, users=1,
                          keep_alive_s=self.keep_alive_s, gpu_bytes=request.gpu_bytes, remote=request.remote,
                          memory=memory, placement=request.placement)
            self._entries[request.key] = entry
            self._emit("loaded", request.key, ledger.describe(request.name, memory.estimate, memory.measured,
                                                              memory.source))
            self._cond.notify_all()
        on_gone = getattr(model, "on_gone", None)  # a model in a runner process says when that process ends
        if callable(on_gone):
            on_gone(lambda reason: self.gone(request.key, model, reason))
        self._record(entry, first=True)
        return entry

    def _record(self, entry: Entry, *, first: bool = False) -> None:
        """Into the ledger, outside the lock: its measure after its load (``first``), or at its end if it grew."""
        with self._cond:
            self._observe(entry)
            record = entry.memory.record(entry.name, entry.key.partition("|")[0], first=first)
        if self.ledger is None or record is None:
            return
        try:
            self.ledger.put(record)
        except (OSError, OrionError) as exc:  # the measure still counts here; only the next load loses it
            self._emit("warning", entry.key, f"the memory ledger {self.ledger.path} could not be written: {exc}")
            return
        with self._cond:
            entry.memory.recorded = record.measured

    @staticmethod
    def _observe(entry: Entry) -> None:  # under the lock: a runner's heartbeat RSS may raise its measure
        entry.memory.observe(getattr(entry.model, "rss_bytes", None))

    def _used_bytes(self) -> int:
        return (sum(e.budget_bytes for e in self._entries.values())
                + sum(r.estimate_bytes for r in self._loading_requests.values()))

    def _used_gpu_bytes(self) -> int:
        return (sum(e.memory.gpu_bytes for e in self._entries.values())
                + sum(r.gpu_bytes for r in self._loading_requests.values()))

    def _used_on_gpu(self, index: int) -> int:
        """What the loaded models (their measure, else their estimate) and the loads in progress hold on
        GPU ``index``."""
        device = ledger.gpu_device(index)
        loading = (_gpu_parts(r) for r in self._loading_requests.values())
        return (sum(e.memory.on(device) for e in self._entries.values())
                + sum(parts[index] for parts in loading if index < len(parts)))

    def _gpu_over(self, request: Request) -> int | None:
        """The first GPU whose budget the request's part there does not fit beside what is loaded on it
        (None: every one fits, or the budgets are not per GPU)."""
        for i, part in enumerate(_gpu_parts(request)):
            if part and i < len(self.gpu_budgets) and self._used_on_gpu(i) + part > self.gpu_budgets[i]:
                return i
        return None

    def _used_remote_bytes(self, endpoint: str) -> int:
        return (sum(b for e in self._entries.values() for where, b, _ in e.remote if where == endpoint)
                + sum(b for r in self._loading_requests.values() for where, b, _ in r.remote if where == endpoint))

    # (models in self._closing are not counted: a load waits until none is left, and the victims a
    # load chose itself are the room it makes)

    def _remote_over(self, request: Request) -> tuple[str, str]:
        """The first RPC server the request's part does not fit beside what is loaded there, and why
        (('', '') if none)."""
        needs: dict[str, list[int]] = {}
        for where, b, budget in request.remote:
            needs.setdefault(where, [0, budget])[0] += b
        for where, (b, budget) in needs.items():
            if self._used_remote_bytes(where) + b > budget:
                return where, (f"{format_bytes(self._used_remote_bytes(where))} of {format_bytes(budget)} in use "
                               f"on RPC server {where}")
        return "", ""

    def _make_room(self, request: Request) -> list[tuple[Entry, str, str]]:
        """Take idle models out of use, least recently used first, until the request fits (the
        caller closes them, outside the lock); else refuse."""
        need = request.estimate_bytes
        need_gpu = request.gpu_bytes
        gpu_budget = self.gpu_budget_bytes or 0
        if need > self.budget_bytes:
            self._refuse(request, f"{request.name} needs {format_bytes(need)}, the budget is "
                                  f"{format_bytes(self.budget_bytes)} even with nothing else loaded")
        if need_gpu > gpu_budget:
            self._refuse(request, f"{request.name} needs {format_bytes(need_gpu)} of VRAM, the GPU budget is "
                                  f"{format_bytes(gpu_budget)} even with nothing else loaded")
        for i, part in enumerate(_gpu_parts(request)):
            if part and i < len(self.gpu_budgets) and part > self.gpu_budgets[i]:
                self._refuse(request, f"{request.name} needs {format_bytes(part)} of VRAM on GPU {i}, its budget is "
                                      f"{format_bytes(self.gpu_budgets[i])} even with nothing else loaded")

        victims: list[tuple[Entry, str, str]] = []
        order = list(self._entries)  # the LRU order, for a refusal that gives them back
        for entry in self._entries.values():
            self._observe(entry)

        def lack() -> str:
            """What the request lacks now: 'count', 'ram', 'gpu', 'remote', 'available' ('' if nothing)."""
            if len(self._entries) + len(self._loading) >= self.max_models:
                return "count"
            if self._used_bytes() + need > self.budget_bytes:
                return "ram"
            if need_gpu and self._used_gpu_bytes() + need_gpu > gpu_budget:
                return "gpu"
            if need_gpu and self._gpu_over(request) is not None:
                return "gpu-one"
            if request.remote and self._remote_over(request)[0]:
                return "remote"
            if self._available is None:
                return ""
            # the victims taken so far are not closed yet: what they hold is as good as free; what other
            # loads will take is not taken yet
            loading = sum(r.estimate_bytes for r in self._loading_requests.values())
            return "" if need + loading <= self._available() + sum(v.budget_bytes for v, _, _ in victims) else "available"

        try:
            return self._choose_victims(request, lack, victims, need, gpu_budget)
        except BaseException:  # refused, or a probe failed: nothing was closed, all goes back
            self._put_back(victims, order)
            raise

    def _choose_victims(self, request: Request, lack, victims: list, need: int, gpu_budget: int) -> list:
        while what := lack():
            # a model on another RPC server frees nothing the request lacks there
            over = self._remote_over(request)[0] if what == "remote" else ""
            # a model off the GPU that lacks room frees nothing there
            gpu = self._gpu_over(request) if what == "gpu-one" else None
            victim = next((e for e in self._entries.values() if not e.pinned and e.users == 0
                           and (not over or any(where == over for where, _, _ in e.remote))
                           and (gpu is None or e.memory.on(ledger.gpu_device(gpu)) > 0)), None)
            if victim is None:
                if self._loading:  # loads in progress hold room that may be free again when they end
                    raise _WaitForLoads()
                busy = ", ".join(e.name for e in self._entries.values()) or "none"
                if what == "count":
                    why = f"{len(self._entries)} of {self.max_models} models loaded"
                elif what == "gpu":
                    why = f"{format_bytes(self._used_gpu_bytes())} of {format_bytes(gpu_budget)} VRAM in use"
                elif what == "gpu-one":
                    gpu = self._gpu_over(request)
                    why = (f"it needs {format_bytes(_gpu_parts(request)[gpu])} on GPU {gpu}, where "
                           f"{format_bytes(self._used_on_gpu(gpu))} of {format_bytes(self.gpu_budgets[gpu])} is in use")
                elif what == "remote":
                    why = self._remote_over(request)[1]
                else:
                    why = f"{format_bytes(self._used_bytes())} of {format_bytes(self.budget_bytes)} in use"
                self._refuse(request, f"{request.name} needs {format_bytes(need)}; {why}, none of them idle "
                                      f"and unpinned ({busy})")
            victims.append(self._take(victim, "evicted", f"to make room for {request.name}"))
        return victims

    def _take(self, entry: Entry, kind: str, detail: str) -> tuple[Entry, str, str]:
        """Out of use, to be closed by :meth:`_close` (under the lock)."""
        self._entries.pop(entry.key, None)
        self._closing[entry.key] = entry
        return entry, kind, detail

    def _put_back(self, taken: list[tuple[Entry, str, str]], order: list[str]) -> None:
        """A refused request gives back the models it had taken out (nothing was closed yet), each at
        its place in the LRU order."""
        if not taken:
            return
        back = {e.key: e for e, _, _ in taken}
        for key in back:
            self._closing.pop(key, None)
        rank = {key: i for i, key in enumerate(order)}
        merged = {**self._entries, **back}
        self._entries = dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def _close(self, taken: list[tuple[Entry, str, str]]) -> None:
        """Close models taken out of use, outside the lock; then their memory is free. Every one is
        closed even when one fails (the first error is raised after): none stays in ``_closing``,
        where it would hold every later load."""
        first: BaseException | None = None
        for entry, kind, detail in taken:
            self._record(entry)  # what it grew to since its load (its last heartbeat)
            try:
                entry.model.close()
            except BaseException as exc:  # noqa: BLE001 - raised below, once all are closed
                first = first or exc
            finally:
                with self._cond:  # the event first: a load waiting on this close says 'loading' after it
                    self._emit(kind, entry.key, f"{entry.name}: {detail}")
                    self._closing.pop(entry.key, None)
                    self._cond.notify_all()
        if first is not None:
            raise first

    def _refuse(self, request: Request, message: str) -> None:
        self._emit("refused", request.key, message)
        raise ModelDoesNotFit(message, hint=request.hint or "use a smaller quantization or --ctx")

    # ------------------------------------------------------------ control

    def pin(self, key: str, pinned: bool = True) -> None:
        with self._cond:
            self._entries[key].pinned = pinned

    def load(self, request: Request, *, pin: bool | None = None, keep_alive_s: int | None | str = "default") -> None:
        """Load a model (or find it loaded) without using it; optionally pin it or give it its own keep-alive."""
        with self.use(request):  # set while it is in use: it cannot be evicted in between
            with self._cond:
                entry = self._entries.get(request.key)
                if entry is not None:
                    if pin is not None:
                        entry.pinned = pin
                    if keep_alive_s != "default":
                        entry.keep_alive_s = keep_alive_s  # type: ignore[assignment]
                        self._cond.notify_all()  # the timer's next look may come sooner

    def peek(self, key: str) -> Any:
        """The loaded model for ``key`` (None if not loaded), without using it or changing its LRU place."""
        with self._cond:
            entry = self._entries.get(key)
            return entry.model if entry is not None else None

    def gone(self, key: str, model: Any, reason: str) -> bool:
        """A loaded model ended by itself (its runner process crashed, was killed, lost an RPC server):
        forgotten at once, in use or not (its requests fail on their own), with a ``gone`` event; the
        next request loads it again. False if ``model`` is no longer the one loaded under ``key``."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.model is not model:
                return False
            self._entries.pop(key)
            self._emit("gone", key, f"{entry.name}: {reason}")
            self._cond.notify_all()
        self._record(entry)
        try:
            model.close()  # reaps what is left of it (the process has ended)
        except Exception:  # noqa: BLE001 - it is gone either way
            pass
        return True

    def unload(self, key: str) -> bool:
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.users:
                raise ModelInUse(f"{entry.name} is in use",
                                 hint="it is unloaded once its requests finish (keep-alive), or try again")
            taken = [self._take(entry, "unloaded", "on request")]
        self._close(taken)
        return True

    def cancel(self, key: str) -> bool:
        """Cancel a load in progress (the loader sees its cancel event set)."""
        with self._cond:
            event = self._loading.get(key)
            if event is None:
                return False
            event.set()
            return True

    def collect_idle(self) -> list[str]:
        """Unload models idle for longer than their keep-alive; returns their keys."""
        with self._cond:
            now = self._clock()
            idle = [e for e in self._entries.values()
                    if not e.pinned and e.users == 0 and e.keep_alive_s is not None
                    and now - e.last_used >= e.keep_alive_s]
            taken = [self._take(e, "unloaded", f"idle for {now - e.last_used:.0f} s (keep-alive {e.keep_alive_s} s)")
                     for e in idle]
        self._close(taken)
        return [e.key for e in idle]

    def status(self) -> list[ManagerStatus]:
        """The loaded models, most recently used first."""
        with self._cond:
            now = self._clock()
            out = []
            for e in reversed(self._entries.values()):
                expires = None
                if not e.pinned and e.users == 0 and e.keep_alive_s is not None:
                    expires = max(0.0, e.last_used + e.keep_alive_s - now)
                self._observe(e)
                out.append(ManagerStatus(e.name, e.key, e.estimate_bytes, now - e.last_used, e.pinned, e.users > 0,
                                         now - e.loaded_at, e.users, e.keep_alive_s, expires, e.gpu_bytes,
                                         sum(b for _, b, _ in e.remote), e.memory.copy(), e.budget_bytes,
                                         e.placement))
            return out

    def _timer_loop(self) -> None:
        while True:
            with self._cond:
                if self._stop.is_set():
                    return
                alive = [e.keep_alive_s for e in self._entries.values() if e.keep_alive_s is not None]
                period = max(0.5, min(30.0, min(alive, default=60) / 4))
                # woken early by any change (a load, a shorter keep-alive, close): the period is then
                # worked out again, so a model given 2 s is not left for the 15 s the last one allowed
                self._cond.wait(period)
            if self._stop.is_set():
                return
            try:
                self.collect_idle()
            except Exception as exc:  # noqa: BLE001 - a model that failed to close: say so, keep the timer
                self._emit("failed", "", f"unloading an idle model failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Unload everything; loads in progress are cancelled (a load that ends anyway is closed), and
        no new load starts."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()  # the keep-alive timer ends now
            self._closed = True
            for cancel in self._loading.values():
                cancel.set()
            taken = [self._take(entry, "unloaded", "shutting down") for entry in list(self._entries.values())]
        self._close(taken)


def _gpu_parts(request: Request) -> tuple[int, ...]:
    """A request's VRAM on each GPU by index (one figure on GPU 0 where it gives no parts)."""
    return tuple(request.gpu_parts) if request.gpu_parts else ((request.gpu_bytes,) if request.gpu_bytes else ())
