"""What ``orion serve`` owns: one model manager, the models clients named, their queues and leases
(:mod:`.scheduler`), one shared encoder per encoder model, events (:mod:`.events`), metrics.

Plain threads and locks, no web framework: the routes (``app.py``) call these from worker threads,
and tests call them directly.

- Each model has a bounded queue: its requests are decoded together, several sequences in one
  llama_decode (the model's one decoder), and wait for room when all its sequences are busy; past
  the bound a request is refused at once (HTTP 503 with Retry-After). A request holds the model
  "in use" in the manager from the moment it is queued (its :class:`~.scheduler.Lease`), so a model
  with requests waiting is never evicted.
- One :class:`SharedEncoder` per encoder model, shared by every client: embedding requests are
  merged into shared batches (:class:`~.scheduler.EmbeddingBatcher`); truncation, normalisation and
  chunking are the core encoder's own (:mod:`orion_cli.embeddings`), as in ``orion embed --local``.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..manager import Request
from .access import ModelAccess
from .events import EventLog
from .metrics import Metrics
from .scheduler import EmbeddingBatcher, Lease, ModelQueue, QueueFull

__all__ = ["EmbeddingBatcher", "EventLog", "Lease", "Metrics", "ModelQueue", "QueueFull", "Served", "ServerState",
           "SharedEncoder"]


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
    dim: int = 0  # encoders: the vector size, read from the GGUF once, when resolved


class SharedEncoder:
    """One served encoder for every client: embeddings through the shared batcher, and chunks, with
    the core :class:`orion_cli.embeddings.Encoder`'s truncation, normalisation and chunking (one
    Encoder for each load of the model, not one a request)."""

    def __init__(self, served: Served, manager, *, limit: int) -> None:
        self.served = served
        self._manager = manager
        self.batcher = EmbeddingBatcher(served.name, self._embed_tokens, limit=limit)
        self._lock = threading.Lock()
        # the core Encoder of the model as loaded now: a reload makes another (the closed model it
        # kept until then is a small Python object; its llama.cpp memory went with close())
        self._encoder = None

    def _embed_tokens(self, sequences):
        with self._manager.use(self.served.request) as model:
            self.batcher.size_to(model.n_contexts, model.spec.n_ctx * model.spec.settings.embed_pack)
            return model.embed_tokens(sequences)

    def _core(self, model):
        from ..embeddings import Encoder

        with self._lock:
            if self._encoder is None or self._encoder.model is not model:
                self._encoder = Encoder(model, model_id=self.served.model_id, max_tokens=self.served.n_ctx)
            return self._encoder

    def sequences(self, model, inputs: list) -> tuple[list[list[int]], int]:
        """Token sequences within the window (texts truncated as the core encoder truncates them,
        keeping [SEP]; token arrays cut at the window), and how many were truncated."""
        from ..embeddings import truncate

        window = self.served.n_ctx
        sequences, truncated = [], 0
        texts = [item for item in inputs if isinstance(item, str)]
        tokenized = iter(model.tokenize_many(texts) if texts else [])  # one call: the model may be in a runner
        for item in inputs:
            ids = next(tokenized) if isinstance(item, str) else list(item)
            if len(ids) > window:
                ids = truncate(ids, window) if isinstance(item, str) else ids[:window]
                truncated += 1
            sequences.append(ids)
        return sequences, truncated

    def embed(self, inputs: list) -> tuple[Any, int, int]:
        """(normalised float32 rows, tokens embedded, inputs truncated)."""
        with self._manager.use(self.served.request) as model:
            sequences, truncated = self.sequences(model, inputs)
            vectors = self.batcher.submit(sequences).result()
        return vectors, sum(len(s) for s in sequences), truncated

    def chunks(self, text: str) -> list:
        with self._manager.use(self.served.request) as model:
            return self._core(model).chunks(text)

    def close(self) -> None:
        self.batcher.close()


GPU_READING_S = 1.0  # how long a reading of the GPUs' memory is used again
MAX_NAMES = 4096  # names remembered (each a model served here, under the words a client used)


def runners_enabled(env=None) -> bool:
    """``ORION_RUNNERS``: 1 (the default) loads each model in a runner process, 0 in the server's own."""
    import os

    from ..errors import ConfigError

    text = (env if env is not None else os.environ).get("ORION_RUNNERS", "1").strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"ORION_RUNNERS must be 1 or 0, not {text[:40]!r}", hint="unset it for the default (1)")


class ServerState:
    """Everything ``orion serve`` owns; the routes call into it from worker threads.

    ``memory``: the probe ``/api/orion/ps`` reports pressure from (default :func:`orion_cli.device.memory_now`,
    which reads a container's cgroup limit where it is below the RAM); ``gpus``: the GPUs' memory now
    (default :func:`orion_cli.device.detect_gpus` where the strategy has a GPU budget, else none);
    ``clock``: the memory history's (:class:`.machine.MemoryHistory`, sampled while :meth:`sample_memory`
    runs: ``orion serve`` starts it). Tests inject all three."""

    def __init__(self, strategy, *, max_queue: int = 8, parallel: int = 4, access: ModelAccess | None = None,
                 on_line: Callable[[str], None] | None = None, memory: Callable[[], Any] | None = None,
                 runners: bool | None = None, gpus: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        from .. import rpc
        from ..device import detect_gpus, memory_now
        from ..loading import manager_for
        from .machine import MemoryHistory

        self.strategy = strategy
        self.max_queue = max_queue
        self.parallel = parallel  # chat sequences of one model decoded together
        self.access = access or ModelAccess()  # the models clients may name (default: those registered here)
        # each model in a runner process of its own (a native fault ends that model, not the server);
        # ORION_RUNNERS=0: in this process (measurements, debugging)
        self.runners = runners if runners is not None else runners_enabled()
        self.memory = memory or memory_now
        self._read_gpus = gpus or (detect_gpus if strategy.gpu_budget_bytes is not None else (lambda: ()))
        self._gpus_read: tuple[float, Any] | None = None  # (monotonic time, reading): nvidia-smi once a second at most
        self.history = MemoryHistory(self._memory_sample, clock=clock, on_error=on_line)
        self.events = EventLog(on_line=on_line)
        rpc.warn = self.events.warning  # an RPC server left out at load time: an event, not only a line
        self.metrics = Metrics()
        # each load measured (its runner's memory, or in-process the RSS it adds, one load at a time)
        self.manager = manager_for(strategy, on_event=self.events, timer=True, runners=self.runners)
        self.started = time.time()
        self.stopping = threading.Event()  # set at SIGINT/SIGTERM: event streams end
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {}  # by manager key
        self._names: dict[str, Served] = {}  # by "llm:NAME" or "encoder:NAME|PREFER_ID", as clients asked
        self._queues: dict[str, ModelQueue] = {}
        self._encoders: dict[str, SharedEncoder] = {}
        self._resolving: dict[str, list] = {}  # name -> [its lock, holders and waiters]: names being resolved

    # ------------------------------------------------------------ resolving names

    def llm(self, name: str) -> Served:
        """The LLM a request names (as :attr:`access` allows: a registered name, org/repo, a path), resolved once."""
        with self._lock:
            if f"llm:{name}" in self._names:
                return self._names[f"llm:{name}"]
        with self._resolving_lock(f"llm:{name}"):  # concurrent first requests: one fetch, one estimate
            return self._names.get(f"llm:{name}") or self._resolve_llm(name)

    def _resolve_llm(self, name: str) -> Served:
        from ..errors import WrongModelKind
        from ..loading import model_request

        local = self.access.local_model(name, self.strategy)
        if local.kind == "encoder":
            raise WrongModelKind(f"{name} is an encoder", hint="use it with /v1/embeddings")
        request = model_request(local, self.strategy, parallel=self.parallel, runner=self.runners)
        return self._remember(f"llm:{name}", Served(name, request, Path(local.path), local.file_type, "llm",
                                                     self.strategy.n_ctx))

    def encoder(self, name: str | None, prefer_id: str | None = None) -> Served:
        """The encoder a request names (default minilm; ``MODEL@TYPE`` for a type), resolved once."""
        cache_key = f"encoder:{name}|{prefer_id}"
        with self._lock:
            if cache_key in self._names:
                return self._names[cache_key]
        with self._resolving_lock(cache_key):  # concurrent first requests: one conversion, not one each
            return self._names.get(cache_key) or self._resolve_encoder(name, prefer_id, cache_key)

    def _resolve_encoder(self, name: str | None, prefer_id: str | None, cache_key: str) -> Served:
        from ..gguf_header import read_local_header
        from ..loading import model_request

        local, model_id, max_tokens = self.access.encoder_model(name, self.strategy, prefer_id=prefer_id)
        request = model_request(local, self.strategy, n_ctx=max_tokens, embedding=True, runner=self.runners)
        header = read_local_header(Path(local.path))  # its vector size, once: not on every request
        return self._remember(cache_key, Served(name or "minilm", request, Path(local.path), local.file_type,
                                                "encoder", max_tokens, model_id=model_id, dim=header.n_embd))

    def resolve_any(self, name: str, embedding: bool) -> Served:
        """An LLM, or an encoder when the name is one (or ``embedding`` says so)."""
        from ..errors import WrongModelKind

        if embedding:
            return self.encoder(name)
        try:
            return self.llm(name)
        except WrongModelKind:
            return self.encoder(name)

    @contextmanager
    def _resolving_lock(self, name_key: str):
        """Held during one name's first resolution (a fetch or a conversion may take minutes: other
        names resolve meanwhile; the same name waits for it and shares its answer). The lock is gone
        once no one holds or waits for it: made-up names leave nothing behind."""
        with self._lock:
            entry = self._resolving.setdefault(name_key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    self._resolving.pop(name_key, None)

    def _remember(self, name_key: str, served: Served) -> Served:
        """One entry (and one queue) per model, whatever names clients use for it."""
        with self._lock:
            served = self._served.setdefault(served.request.key, served)
            while len(self._names) >= MAX_NAMES:  # the names clients used: a cache, bounded (the oldest go)
                self._names.pop(next(iter(self._names)))
            self._names[name_key] = served
            self._queues.setdefault(served.request.key, ModelQueue(served.name, self.max_queue))
            return served

    def by_key(self, key: str) -> Served | None:
        with self._lock:
            return self._served.get(key)

    def loaded_key(self, name: str) -> str | None:
        """The manager key of the loaded model a client names (its name, key, or vectors' id)."""
        loaded = {s.key: s for s in self.manager.status()}
        for key, status in loaded.items():
            served = self.by_key(key)
            if name in (status.name, key) or (served is not None and name in (served.name, served.model_id)):
                return key
        served = self.by_key(name)
        return served.request.key if served is not None and served.request.key in loaded else None

    # ------------------------------------------------------------ what is here

    def models_here(self) -> list[dict]:
        """``/v1/models``: what this server has, OpenAI's fields (``id``, ``object``, ``created``,
        ``owned_by``) and its kind: the models registered here whose files are on this machine
        (imported, or fetched into the HF cache; the built-in encoder among them once it is here:
        fetched, it is registered as minilm), and the models loaded now, by the name clients used.
        Not the catalog's names that are not here: a client that picks one from the list would get
        an error offline (a fetch, at best)."""
        from datetime import datetime

        from ..models import Registry

        out: dict[str, dict] = {}
        registered = {name: m for name, m in Registry().all().items() if m.exists()}
        for name, m in registered.items():
            try:
                created = int(datetime.fromisoformat(m.added).timestamp()) if m.added else int(self.started)
            except ValueError:
                created = int(self.started)
            owner = m.repo.split("/", 1)[0] if m.source == "hub" and m.repo else "orion"
            out[name] = {"id": name, "object": "model", "created": created, "owned_by": owner, "kind": m.kind}
        for status in self.manager.status():  # loaded: a path (--allow-paths), a type (minilm@f16)...
            served = self.by_key(status.key)
            name = served.name if served is not None else status.name
            if name not in out:
                kind = served.kind if served is not None else "llm"
                out[name] = {"id": name, "object": "model", "created": int(self.started), "owned_by": "orion",
                             "kind": kind}
        return list(out.values())

    def model_here(self, name: str) -> dict | None:
        """``/v1/models/{id}``: one of :meth:`models_here`, or None."""
        return next((m for m in self.models_here() if m["id"] == name), None)

    # ------------------------------------------------------------ using models

    def lease(self, served: Served) -> Lease:
        """A queue place and the model held in use, for :meth:`Lease.acquire` (no turn to wait for: the
        model's requests are decoded together, up to its parallel sequences)."""
        with self._lock:
            queue = self._queues[served.request.key]
        return Lease(queue, lambda: self.manager.use(served.request))

    def shared_encoder(self, served: Served) -> SharedEncoder:
        with self._lock:
            encoder = self._encoders.get(served.request.key)
            if encoder is None:
                encoder = SharedEncoder(served, self.manager, limit=self.max_queue * 8)
                self._encoders[served.request.key] = encoder
            return encoder

    def queue_depths(self) -> dict[str, int]:
        with self._lock:
            depths = {key: q.pending for key, q in self._queues.items()}
            for key, e in self._encoders.items():
                depths[key] = depths.get(key, 0) + e.batcher.depth
        return depths

    # ------------------------------------------------------------ the machine

    def gpus(self):
        """The GPUs' memory now (read again once the last reading is a second old: every open dashboard and
        the memory history ask, and without NVML each reading is an nvidia-smi process)."""
        with self._lock:
            if self._gpus_read is not None and time.monotonic() - self._gpus_read[0] < GPU_READING_S:
                return self._gpus_read[1]
        reading = self._read_gpus()
        with self._lock:
            self._gpus_read = (time.monotonic(), reading)
        return reading

    def gpu_budgets(self) -> list[int]:
        """Each GPU's budget (measured once, before this process loaded anything)."""
        from ..placement import gpu_budgets_now

        return gpu_budgets_now(self.strategy)

    def _memory_sample(self) -> dict:
        from .machine import machine_document, memory_sample

        return memory_sample(machine_document(self.strategy, self.memory(), self.gpus(), self.manager.status(),
                                              self.gpu_budgets()))

    def sample_memory(self) -> threading.Thread:
        """The memory history sampled in a thread of its own until :attr:`stopping` is set."""
        thread = threading.Thread(target=self.history.run, args=(self.stopping,), name="orion-memory-history",
                                  daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:
            encoders = list(self._encoders.values())
        for encoder in encoders:
            encoder.close()
        self.manager.close()
