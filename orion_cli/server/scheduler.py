"""Admission: who may use a model now, and for how long.

- :class:`ModelQueue`: at most ``limit`` requests for one model at once, running or waiting for room
  in its decoder; past the bound a request is refused at once (:class:`QueueFull`: 503 with
  Retry-After).
- :class:`Lease`: one request's queue place and its model held in use in the manager (so a model
  with requests waiting is never evicted), given back exactly once, whichever way the request ends.
- :class:`EmbeddingBatcher`: concurrent embedding requests for one encoder merged into shared
  batches (a token budget per batch, sorted by length, a short wait for company), as TEI and
  infinity do.

Plain threads and locks: the routes call these from worker threads, and tests call them directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

from ..errors import OrionError
from .http_errors import QueueFull

__all__ = ["EmbeddingBatcher", "Lease", "ModelQueue", "QueueFull"]


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


class Lease:
    """A request's place in its model's queue and the model held in use, given back exactly once:
    when its last holder lets go.

    A streamed answer has two holders. The response is one (its ASGI call ends however the client
    leaves, even when Starlette sees the disconnect before it first iterates the body, and then never
    does); the worker thread that generates is the other (once the client is gone it stops at its next
    token, and the model must not be given back while it still decodes). So a client that goes away
    releases what it held, as llama.cpp's ``server_response_reader`` does in its destructor.
    """

    def __init__(self, queue: ModelQueue, use: Callable[[], ContextManager]) -> None:
        self._queue = queue
        self._use = use  # the manager's use(request): the model, loaded if it must be
        self._lock = threading.Lock()
        self._holders = 1  # the request itself
        self._context: ContextManager | None = None
        self.state = "new"  # new -> held -> returned (or new -> returned: never acquired)
        self.model: Any = None

    def acquire(self) -> Any:
        """Take the queue place (QueueFull at once if there is none), then the model (in a worker
        thread: it may load)."""
        self._queue.reserve()
        try:
            context = self._use()
            model = context.__enter__()
        except BaseException:
            self._queue.release()
            with self._lock:
                self.state = "returned"
            raise
        with self._lock:
            self._context, self.model = context, model
            abandoned = self._holders == 0  # let go of while it loaded
            self.state = "returned" if abandoned else "held"
        if abandoned:
            self._give_back()
            raise OrionError("the request was given up while its model loaded")
        return model

    def hold(self) -> None:
        """One more holder (the worker of a stream); it calls :meth:`release` once when done."""
        with self._lock:
            if self.state != "held" or not self._holders:
                raise RuntimeError("the lease is not held")
            self._holders += 1

    def release(self) -> None:
        """One holder lets go; the last gives the model and the queue place back."""
        with self._lock:
            if not self._holders:
                return
            self._holders -= 1
            if self._holders or self.state != "held":
                return  # others still hold it, or acquire() gives it back when it ends
            self.state = "returned"
        self._give_back()

    def _give_back(self) -> None:
        context, self._context, self.model = self._context, None, None
        try:
            context.__exit__(None, None, None)
        finally:
            self._queue.release()

    def __enter__(self) -> Any:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- embeddings


@dataclass
class _Job:
    sequences: list[list[int]]
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


# Batches sized to the encoder's pool: each gives every context this many full decodes (a decode's
# tokens: the window times the sequences packed in it), so the per-batch work (the runner's message,
# normalising, handing rows back) is paid once for many decodes.
DECODES_A_BATCH = 4
MIN_TOKEN_BUDGET = 8192  # a batch's tokens before the pool is known, and the least after
BATCHES_IN_FLIGHT = 2  # one decoding while the last one's rows go back and the next one gathers


class EmbeddingBatcher:
    """Merges concurrent embedding requests for one encoder into shared batches.

    Worker threads (``workers``: batches in flight) each take the first waiting request, wait up to
    ``max_wait_s`` for more, and take requests while the batch stays under ``token_budget`` tokens
    (:meth:`size_to` sets it from the pool: every context fed); their sequences are embedded sorted by
    length (the pool shares them out between its contexts) and each request gets its rows back,
    normalised as the core's :class:`orion_cli.embeddings.Encoder` normalises them.
    """

    def __init__(self, name: str, embed: Callable[[Sequence[Sequence[int]]], Any], *,
                 token_budget: int = MIN_TOKEN_BUDGET, max_wait_s: float = 0.005, limit: int = 64,
                 workers: int = BATCHES_IN_FLIGHT) -> None:
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
        self._workers = [threading.Thread(target=self._run, name=f"orion-batcher-{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for worker in self._workers:
            worker.start()

    def size_to(self, contexts: int, decode_tokens: int) -> None:
        """Batches of :data:`DECODES_A_BATCH` full decodes for each of ``contexts`` contexts, each decode
        ``decode_tokens`` tokens (never below the default budget)."""
        with self._cond:
            self.token_budget = max(MIN_TOKEN_BUDGET, contexts * decode_tokens * DECODES_A_BATCH)

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

        from ..embeddings import normalise

        while True:
            batch = self._take()
            if batch is None:
                return
            rows = [(j, i, seq) for j, job in enumerate(batch) for i, seq in enumerate(job.sequences)]
            rows.sort(key=lambda r: len(r[2]))
            try:
                vectors = normalise(np.asarray(self._embed([r[2] for r in rows]), dtype=np.float32))
            except BaseException as exc:  # every waiting request gets the error
                for job in batch:
                    job.future.set_exception(exc)
                continue
            out = [np.empty((len(job.sequences), vectors.shape[1]), dtype=np.float32) for job in batch]
            for (j, i, _), v in zip(rows, vectors):
                out[j][i] = v
            with self._cond:
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
