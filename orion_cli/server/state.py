"""What ``orion serve`` owns: one model manager, the shared encoders, per-model queues, events, metrics.

Plain threads and locks, no web framework: the routes (``app.py``) call these from worker threads,
and tests call them directly.

- Each model has a bounded queue (:class:`ModelQueue`): its requests are decoded together, several
  sequences in one llama_decode (engine.ParallelDecoder), and wait for room when all its sequences
  are busy; past the bound a request is refused at once (HTTP 503 with Retry-After). A request holds
  the model "in use" in the manager from the moment it is queued, so a model with requests waiting
  is never evicted.
- One encoder per encoder model, shared by every client: embedding requests are merged into
  shared batches (:class:`EmbeddingBatcher`: a token budget per batch, sorted by length, a short
  wait for company), as TEI and infinity do.
"""

from __future__ import annotations

import dataclasses

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import OrionError
from ..manager import Event, Request


class QueueFull(OrionError):
    """A model's request queue is full: try again shortly."""

    def __init__(self, model: str, depth: int, retry_after_s: int = 1) -> None:
        super().__init__(f"{model} has {depth} requests queued, the most it takes",
                         hint=f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


# ---------------------------------------------------------------- events


class EventLog:
    """The manager's events: the latest kept, every one printed, and pushed to live subscribers."""

    def __init__(self, keep: int = 200, on_line: Callable[[str], None] | None = None) -> None:
        self.latest: deque[dict] = deque(maxlen=keep)
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()
        self._on_line = on_line
        self.counts: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        doc = {"kind": event.kind, "model": event.key, "detail": event.detail, "at": time.time()}
        with self._lock:
            self.latest.append(doc)
            self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
            subscribers = list(self._subscribers)
        if self._on_line:
            self._on_line(f"{time.strftime('%H:%M:%S')} {event.kind:<9} {event.detail or event.key}")
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, doc)
            except RuntimeError:  # that loop is closed
                pass

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]


# ---------------------------------------------------------------- queues


class ModelQueue:
    """At most ``limit`` requests for one model at once, running or waiting for room in its decoder."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.pending = 0  # running + waiting
        self._count = threading.Lock()

    def reserve(self) -> None:
        """Take a place in the queue, or raise :class:`QueueFull` at once."""
        with self._count:
            if self.pending >= self.limit:
                raise QueueFull(self.name, self.pending)
            self.pending += 1

    def release(self) -> None:
        with self._count:
            self.pending -= 1


# ---------------------------------------------------------------- embeddings


@dataclass
class _Job:
    sequences: list[list[int]]
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


class EmbeddingBatcher:
    """Merges concurrent embedding requests for one encoder into shared batches.

    A worker thread takes the first waiting request, waits up to ``max_wait_s`` for more, and
    takes requests while the batch stays under ``token_budget`` tokens; their sequences are
    embedded sorted by length and each request gets its rows back.
    """

    def __init__(self, name: str, embed: Callable[[Sequence[Sequence[int]]], Any], *, token_budget: int = 8192,
                 max_wait_s: float = 0.005, limit: int = 64) -> None:
        self.name = name
        self._embed = embed
        self.token_budget = token_budget
        self.max_wait_s = max_wait_s
        self.limit = limit
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = 0
        self.requests = 0
        self._worker = threading.Thread(target=self._run, name=f"orion-batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def submit(self, sequences: list[list[int]]) -> Future:
        job = _Job(sequences)
        with self._cond:
            if len(self._jobs) >= self.limit:
                raise QueueFull(self.name, len(self._jobs))
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while sum(j.tokens for j in self._jobs) < self.token_budget:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            batch, tokens = [], 0
            while self._jobs and (not batch or tokens + self._jobs[0].tokens <= self.token_budget):
                job = self._jobs.popleft()
                batch.append(job)
                tokens += job.tokens
            return batch

    def _run(self) -> None:
        import numpy as np

        while True:
            batch = self._take()
            if batch is None:
                return
            rows = [(j, i, seq) for j, job in enumerate(batch) for i, seq in enumerate(job.sequences)]
            rows.sort(key=lambda r: len(r[2]))
            try:
                vectors = np.asarray(self._embed([r[2] for r in rows]), dtype=np.float32)
            except BaseException as exc:  # every waiting request gets the error
                for job in batch:
                    job.future.set_exception(exc)
                continue
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            out = [np.empty((len(job.sequences), vectors.shape[1]), dtype=np.float32) for job in batch]
            for (j, i, _), v in zip(rows, vectors):
                out[j][i] = v
            self.batches += 1
            self.requests += len(batch)
            for job, result in zip(batch, out):
                job.future.set_result(result)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            for job in self._jobs:
                job.future.set_exception(OrionError("the server is shutting down"))
            self._jobs.clear()
            self._cond.notify_all()


# ---------------------------------------------------------------- metrics


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}  # [sum, count]
        self.tokens: dict[tuple[str, str], int] = {}  # (model, "in"|"out")

    def request(self, route: str, model: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, model, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            acc = self.latency.setdefault((route, model), [0.0, 0])
            acc[0] += seconds
            acc[1] += 1

    def add_tokens(self, model: str, n_in: int, n_out: int) -> None:
        with self._lock:
            for direction, n in (("in", n_in), ("out", n_out)):
                self.tokens[(model, direction)] = self.tokens.get((model, direction), 0) + n

    def render(self, *, queues: dict[str, int], memory: dict[str, int], events: dict[str, int],
               decode_steps: dict[str, int] | None = None) -> str:
        def esc(text: str) -> str:
            return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

        lines = ["# HELP orion_requests_total Requests answered, by route, model and status.",
                 "# TYPE orion_requests_total counter"]
        with self._lock:
            for (route, model, status), n in sorted(self.requests.items()):
                lines.append(f'orion_requests_total{{route="{esc(route)}",model="{esc(model)}",status="{status}"}} {n}')
            lines += ["# HELP orion_request_seconds Time to answer, by route and model.",
                      "# TYPE orion_request_seconds summary"]
            for (route, model), (total, count) in sorted(self.latency.items()):
                labels = f'route="{esc(route)}",model="{esc(model)}"'
                lines.append(f"orion_request_seconds_sum{{{labels}}} {total:.6f}")
                lines.append(f"orion_request_seconds_count{{{labels}}} {count}")
            lines += ["# HELP orion_tokens_total Tokens in (prompts, inputs) and out (generated).",
                      "# TYPE orion_tokens_total counter"]
            for (model, direction), n in sorted(self.tokens.items()):
                lines.append(f'orion_tokens_total{{model="{esc(model)}",direction="{direction}"}} {n}')
        lines += ["# HELP orion_queue_depth Requests running or waiting, by model.", "# TYPE orion_queue_depth gauge"]
        lines += [f'orion_queue_depth{{model="{esc(m)}"}} {n}' for m, n in sorted(queues.items())]
        lines += ["# HELP orion_model_memory_bytes Estimated memory of each loaded model.",
                  "# TYPE orion_model_memory_bytes gauge"]
        lines += [f'orion_model_memory_bytes{{model="{esc(m)}"}} {n}' for m, n in sorted(memory.items())]
        lines += ["# HELP orion_decode_steps_total llama_decode calls of each loaded model's decoder (since it loaded);",
                  "# several chat requests share one step.", "# TYPE orion_decode_steps_total counter"]
        lines += [f'orion_decode_steps_total{{model="{esc(m)}"}} {n}' for m, n in sorted((decode_steps or {}).items())]
        lines += ["# HELP orion_model_events_total Model manager events (loaded, evicted, unloaded...).",
                  "# TYPE orion_model_events_total counter"]
        lines += [f'orion_model_events_total{{kind="{k}"}} {n}' for k, n in sorted(events.items())]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the server's state


@dataclass
class Served:
    """A model the server resolved: its manager request, file, and what it is."""

    name: str
    request: Request
    path: Path
    file_type: str
    kind: str  # "llm" or "encoder"
    n_ctx: int
    model_id: str = ""  # encoders: the id vectors are tagged with (MODEL@TYPE)
    measured_bytes: int | None = None  # RSS growth when it was loaded


class ServerState:
    """Everything ``orion serve`` owns; the routes call into it from worker threads."""

    def __init__(self, strategy, *, max_queue: int = 8, parallel: int = 4,
                 on_line: Callable[[str], None] | None = None) -> None:
        from ..loading import manager_for

        self.strategy = strategy
        self.max_queue = max_queue
        self.parallel = parallel  # chat sequences of one model decoded together
        self.events = EventLog(on_line=on_line)
        self.metrics = Metrics()
        self.manager = manager_for(strategy, on_event=self.events, timer=True)
        self.started = time.time()
        self.stopping = threading.Event()  # set at SIGINT/SIGTERM: event streams end
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {}  # by manager key
        self._names: dict[str, Served] = {}  # by "llm:NAME" or "encoder:NAME|PREFER_ID", as clients asked
        self._queues: dict[str, ModelQueue] = {}
        self._batchers: dict[str, EmbeddingBatcher] = {}
        self._loading_lock = threading.Lock()
        self._resolving = threading.Lock()

    # ------------------------------------------------------------ resolving names

    def llm(self, name: str) -> Served:
        """The LLM a request names (orion name, org/repo, path), resolved once."""
        with self._lock:
            if f"llm:{name}" in self._names:
                return self._names[f"llm:{name}"]
        with self._resolving:  # concurrent first requests: one fetch, one estimate
            return self._names.get(f"llm:{name}") or self._resolve_llm(name)

    def _resolve_llm(self, name: str) -> Served:
        from ..loading import local_model, model_request

        local = local_model(name, self.strategy)
        if local.kind == "encoder":
            from ..errors import WrongModelKind

            raise WrongModelKind(f"{name} is an encoder", hint="use it with /v1/embeddings")
        request = self._measured(model_request(local, self.strategy, parallel=self.parallel))
        return self._remember(f"llm:{name}", Served(name, request, Path(local.path), local.file_type, "llm",
                                                     self.strategy.n_ctx))

    def encoder(self, name: str | None, prefer_id: str | None = None) -> Served:
        """The encoder a request names (default minilm; ``MODEL@TYPE`` for a type), resolved once."""
        cache_key = f"encoder:{name}|{prefer_id}"
        with self._lock:
            if cache_key in self._names:
                return self._names[cache_key]
        with self._resolving:  # concurrent first requests: one conversion, not one each
            return self._names.get(cache_key) or self._resolve_encoder(name, prefer_id, cache_key)

    def _resolve_encoder(self, name: str | None, prefer_id: str | None, cache_key: str) -> Served:
        from ..loading import encoder_model, model_request

        local, model_id, max_tokens = encoder_model(name, self.strategy, prefer_id=prefer_id)
        request = self._measured(model_request(local, self.strategy, n_ctx=max_tokens, embedding=True))
        return self._remember(cache_key, Served(name or "minilm", request, Path(local.path), local.file_type,
                                                "encoder", max_tokens, model_id=model_id))

    def _remember(self, name_key: str, served: Served) -> Served:
        """One entry (and one queue) per model, whatever names clients use for it."""
        with self._lock:
            served = self._served.setdefault(served.request.key, served)
            self._names[name_key] = served
            self._queues.setdefault(served.request.key, ModelQueue(served.name, self.max_queue))
            return served

    def _measured(self, request: Request) -> Request:
        """The same request, its load measuring the RSS it adds (one load at a time, so it is its own)."""
        def load(cancel):
            from ..device import process_memory_bytes

            with self._loading_lock:
                before = process_memory_bytes()
                model = request.load(cancel)
                served = self._served.get(request.key)
                if served is not None:
                    served.measured_bytes = max(0, process_memory_bytes() - before)
                return model

        return dataclasses.replace(request, load=load)

    def by_key(self, key: str) -> Served | None:
        with self._lock:
            return self._served.get(key)

    # ------------------------------------------------------------ using models

    @contextmanager
    def sharing(self, served: Served) -> Iterator[Any]:
        """A queue place and the model held in use, without waiting for a turn: the model's
        requests are decoded together (engine.ParallelDecoder), up to its parallel sequences."""
        queue = self._queues[served.request.key]
        queue.reserve()
        try:
            with self.manager.use(served.request) as model:
                yield model
        finally:
            queue.release()

    def batcher(self, served: Served) -> EmbeddingBatcher:
        with self._lock:
            batcher = self._batchers.get(served.request.key)
            if batcher is None:
                def embed(sequences):
                    with self.manager.use(served.request) as model:
                        return model.embed_tokens(sequences)

                batcher = EmbeddingBatcher(served.name, embed, limit=self.max_queue * 8)
                self._batchers[served.request.key] = batcher
            return batcher

    def queue_depths(self) -> dict[str, int]:
        with self._lock:
            depths = {key: q.pending for key, q in self._queues.items()}
            for key, b in self._batchers.items():
                depths[key] = depths.get(key, 0) + b.depth
        return depths

    def close(self) -> None:
        for batcher in list(self._batchers.values()):
            batcher.close()
        self.manager.close()
