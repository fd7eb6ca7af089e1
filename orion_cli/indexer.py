"""`orion embed`'s work: files -> chunks -> vectors in the store, skipping what did not change.

A pipeline: threads joined by bounded queues, each stage running ahead of the next.

- the reader: the walk, each file's stat and stored state, then (changed) its bytes and hash;
- the chunker: chunks, their content hashes, the vectors the store already has, token ids; the
  chunks to embed go out in full batches of the encoder's size, drawn across files (a small file's
  chunks share a batch with the next file's);
- the encoders: ``IN_FLIGHT`` batches at once, so the pool's contexts never wait on a join;
- the writer, the calling thread, the store's one writer: a file is written once all its vectors
  are in, whole, files in the order the walk found them, many files a transaction (``COMMIT_ROWS``
  rows or ``COMMIT_S`` seconds). A run stopped anywhere (Ctrl-C, an error in any stage) leaves
  each file with all its new rows or its old state: what the open transaction held is rolled back.

The guarantees of one file at a time are kept: a file whose size and mtime are stored is skipped
unread, one whose hash is stored only gets its new size and mtime; a chunk whose content hash the
store has (in any file), or an earlier file of this run embeds, is not embedded again; files gone
from under the paths are dropped; a file that cannot be read is a failure of its own; the encoder
is made (the model loaded) only once a file changed, in the calling thread.

Each stage's busy seconds are kept (:attr:`EmbedSummary.profile`): where the time goes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .embeddings import Encoder, WalkReport, iter_walk
from .store import Collection, EmbeddingStore, content_hash

IN_FLIGHT = 2  # batches being encoded at once
READ_AHEAD = 16  # files read, waiting for the chunker
BATCHES_AHEAD = 4  # batches tokenised, waiting for an encoder
COMMIT_ROWS = 4096  # a transaction is committed once it holds this many chunks (or touched files)...
COMMIT_S = 1.0  # ...or this long after its first file was ready
POLL_S = 0.1  # how often a stage blocked on a queue looks whether the run was stopped


@dataclass
class EmbedSummary:
    files_seen: int = 0
    files_unchanged: int = 0
    files_embedded: int = 0
    files_failed: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    files_dropped: int = 0
    walk: WalkReport = field(default_factory=WalkReport)
    failures: list[str] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)  # seconds: see Profile.report

    def to_dict(self) -> dict:
        w = self.walk
        return {"files_seen": self.files_seen, "files_unchanged": self.files_unchanged,
                "files_embedded": self.files_embedded, "files_failed": self.files_failed,
                "chunks_embedded": self.chunks_embedded, "chunks_reused": self.chunks_reused,
                "files_dropped": self.files_dropped,
                "skipped": {"hidden": w.hidden, "ignored": w.ignored, "binary": w.binary,
                            "unreadable": w.unreadable, "symlink_loops": w.loops},
                "failures": self.failures}


def path_key(path: Path) -> str:
    """How the store names a file: its absolute path as text. A name that is not UTF-8 (Linux allows
    any bytes) keeps its odd bytes as ``\\xNN`` escapes: the same key on every run, and printable."""
    text = str(path.resolve())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = os.fsencode(text).decode("utf-8", errors="backslashreplace")
    return text


class Profile:
    """The seconds each stage worked (not waited), summed; the encoders' as the time at least one
    batch was being encoded (``encode``) and as the sum over the threads (``encode_threads``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = {k: 0.0 for k in ("walk", "read", "chunk", "encode", "encode_threads",
                                         "write", "load")}
        self.encoder_from: float | None = None  # when the encoder was ready
        self._lock = threading.Lock()
        self._busy, self._since = 0, 0.0

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Time a stage that one thread runs (each key has one writer)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    @contextmanager
    def encoding(self) -> Iterator[None]:
        start = time.perf_counter()
        with self._lock:
            if self._busy == 0:
                self._since = start
            self._busy += 1
        try:
            yield
        finally:
            end = time.perf_counter()
            with self._lock:
                self._busy -= 1
                self.seconds["encode_threads"] += end - start
                if self._busy == 0:
                    self.seconds["encode"] += end - self._since

    def report(self) -> dict[str, float]:
        """Seconds per stage, with ``wall`` (the whole call) and ``encoder_idle`` (from the encoder's
        readiness to the end, the time no batch was being encoded)."""
        wall = time.perf_counter() - self.start
        out = {k: round(v, 4) for k, v in self.seconds.items()} | {"wall": round(wall, 4)}
        if self.encoder_from is not None:
            out["encoder_idle"] = round(max(0.0, self.start + wall - self.encoder_from - self.seconds["encode"]), 4)
        return out


class _Stopped(Exception):
    """The run was stopped (an error elsewhere, Ctrl-C): a stage ends quietly."""


@dataclass(eq=False)
class _File:
    """A changed file on its way through the pipeline."""

    index: int  # its place in the walk
    path: Path
    key: str
    size: int
    mtime_ns: int
    file_hash: str
    text: str
    chunks: list = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # the chunks to embed
    known: dict[str, bytes] = field(default_factory=dict)  # vectors the store had when it was chunked
    vectors: dict[int, bytes] = field(default_factory=dict)  # embedded so far
    missing: int = 0  # chunks of todo not embedded yet


class _Run:
    """What the stages share: queues, the stop flag, the encoder once made, the counts, the profile."""

    def __init__(self, store: EmbeddingStore, c: Collection) -> None:
        self.store, self.c = store, c
        self.stop = threading.Event()
        self.events: queue.Queue = queue.Queue()  # to the writer: never full, a stage never waits on it
        self.to_chunk: queue.Queue = queue.Queue(READ_AHEAD)
        self.batches: queue.Queue = queue.Queue(BATCHES_AHEAD)
        self.encoder = None
        self.encoder_ready = threading.Event()
        # content hashes a file of this run embeds, until committed: the chunker's own, removed by the writer
        self.pending: set[str] = set()
        self.profile = Profile()
        self.seen: set[str] = set()
        self.files_seen = self.unchanged = 0
        self.failures: list[tuple[int, str]] = []

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.put(item, timeout=POLL_S)
            except queue.Full:
                continue

    def get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def wait_encoder(self):
        """The encoder, made by the writer's thread when first asked (the model loads there)."""
        if self.encoder is None:
            self.events.put(("need_encoder",))
            self.encoder_ready.wait()
            if self.stop.is_set() or self.encoder is None:
                raise _Stopped
        return self.encoder

    def start(self, name: str, target: Callable, *args) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except _Stopped:
                return
            except BaseException as exc:  # noqa: BLE001 - raised again in the writer's thread
                self.events.put(("error", exc))
                return
            self.events.put(("done", name))

        thread = threading.Thread(target=run, name=f"orion-embed-{name}", daemon=True)
        thread.start()
        return thread


def _timed(items: Iterator, profile: Profile, stage: str) -> Iterator:
    """``items``, the time taken to make each counted as ``stage``'s."""
    while True:
        with profile.timing(stage):
            item = next(items, None)
        if item is None:
            return
        yield item


def _read(run: _Run, paths: Sequence[Path], report: WalkReport, hidden: bool) -> None:
    """The reader: walk, stat, compare with the store, read and hash what changed."""
    store = run.store.reader()
    try:
        for index, path in enumerate(_timed(iter_walk(paths, report, hidden=hidden), run.profile, "walk")):
            if run.stop.is_set():
                raise _Stopped
            key = path_key(path)
            run.seen.add(key)
            run.files_seen += 1
            with run.profile.timing("read"):
                try:
                    st = path.stat()
                    state = store.file_state(run.c, key)
                    if state and state[0] == st.st_size and state[1] == st.st_mtime_ns:
                        run.unchanged += 1
                        continue
                    data = path.read_bytes()
                    file_hash = hashlib.sha256(data).hexdigest()
                    if state and state[2] == file_hash:
                        run.events.put(("touch", key, st.st_size, st.st_mtime_ns))
                        run.unchanged += 1
                        continue
                    text = data.decode("utf-8", errors="replace")
                except OSError as exc:
                    run.failures.append((index, f"{path}: {exc.strerror or exc}"))
                    continue
            run.put(run.to_chunk, _File(index, path, key, st.st_size, st.st_mtime_ns, file_hash, text))
        run.put(run.to_chunk, None)
    finally:
        store.close()


def _chunk(run: _Run) -> None:
    """The chunker: chunks with their tokens, hashes, known vectors; full batches for the encoders."""
    store = run.store.reader()
    refs: list[tuple[_File, int]] = []
    sequences: list = []
    try:
        while (f := run.get(run.to_chunk)) is not None:
            encoder = run.wait_encoder()
            try:
                with run.profile.timing("chunk"):
                    f.chunks, sequences_of = encoder.chunks_and_sequences(f.text)
                    f.text = ""
                    f.hashes = [content_hash(ch.text) for ch in f.chunks]
                    # an earlier file of this run embeds it (pending is looked at first: a hash leaves it
                    # only once committed, when this connection sees it)
                    ours = {h for h in f.hashes if h in run.pending}
                    f.known = store.known_vectors(run.c, [h for h in f.hashes if h not in ours])
                    f.todo = [i for i, h in enumerate(f.hashes) if h not in f.known and h not in ours]
                tokens = [sequences_of[i] for i in f.todo]
            except OSError as exc:
                run.failures.append((f.index, f"{f.path}: {exc.strerror or exc}"))
                continue
            run.pending.update(f.hashes[i] for i in f.todo)
            f.missing = len(f.todo)
            run.events.put(("file", f))
            for i, seq in zip(f.todo, tokens):
                refs.append((f, i))
                sequences.append(seq)
                if len(refs) >= encoder.batch_size:
                    run.put(run.batches, (refs, sequences))
                    refs, sequences = [], []
        if refs:
            run.put(run.batches, (refs, sequences))
        for _ in range(IN_FLIGHT):
            run.put(run.batches, None)
    finally:
        store.close()


def _encode(run: _Run) -> None:
    """An encoder thread: one batch at a time, its vectors to the writer."""
    while (batch := run.get(run.batches)) is not None:
        refs, sequences = batch
        with run.profile.encoding():
            vectors = run.encoder.encode_sequences_f16(sequences)
        run.events.put(("vectors", refs, vectors))


def embed_paths(
    store: EmbeddingStore,
    encoder: Encoder | Callable[[], Encoder],
    collection: str,
    paths: Sequence[Path],
    *,
    model_id: str | None = None,
    dim: int | None = None,
    hidden: bool = False,
    on_file: Callable[[Path, int], None] | None = None,
    on_chunks: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed the text files under ``paths`` into ``collection``; only new or changed chunks are embedded.

    ``encoder`` may be a function that makes one: it is then called only when a file
    changed, so a re-run over an unchanged corpus never loads the model. ``on_file(path, n)``
    is told of each changed file as it is chunked (n: its chunks to embed), ``on_chunks(n)``
    of each batch embedded; both in the calling thread.
    """
    made: list[Encoder] = []

    def enc() -> Encoder:
        if not made:
            made.append(encoder() if callable(encoder) else encoder)
        return made[0]

    if model_id is None or dim is None:
        model_id, dim = enc().model_id, enc().dim
    c = store.collection(collection, model_id=model_id, dim=dim)
    summary = EmbedSummary()
    run = _Run(store, c)
    if made:
        run.encoder, run.profile.encoder_from = made[0], time.perf_counter()
        run.encoder_ready.set()
    stages = [run.start("reader", _read, run, list(paths), summary.walk, hidden), run.start("chunker", _chunk, run)]
    stages += [run.start(f"encoder-{i}", _encode, run) for i in range(IN_FLIGHT)]
    order: deque[_File] = deque()  # changed files, in the walk's order, until written
    ready: list[_File] = []  # written at the next commit
    touches: list[tuple[str, int, int]] = []
    first_ready: float | None = None
    done = 0

    def commit() -> None:
        with run.profile.timing("write"), store.writing(c):
            for key, size, mtime_ns in touches:
                store.touch_file(c, key, size, mtime_ns)
            for f in ready:
                store.put_file(c, f.key, f.size, f.mtime_ns, f.file_hash, *_rows(store, c, f, enc))
        for f in ready:
            run.pending.difference_update(f.hashes[i] for i in f.todo)
            summary.files_embedded += 1
            summary.chunks_embedded += len(f.todo)
            summary.chunks_reused += len(f.chunks) - len(f.todo)
        ready.clear()
        touches.clear()

    try:
        while True:
            wait = None if first_ready is None else max(0.0, first_ready + COMMIT_S - time.perf_counter())
            try:
                event = run.events.get(timeout=wait)
            except queue.Empty:
                event = ("tick",)
            kind = event[0]
            if kind == "error":
                raise event[1]
            if kind == "done":
                done += 1
            elif kind == "need_encoder":
                if run.encoder is None:
                    with run.profile.timing("load"):
                        run.encoder = enc()
                    run.profile.encoder_from = time.perf_counter()
                run.encoder_ready.set()
            elif kind == "touch":
                touches.append(event[1:])
            elif kind == "file":
                order.append(event[1])
                if on_file:
                    on_file(event[1].path, len(event[1].todo))
            elif kind == "vectors":
                for (f, i), blob in zip(event[1], event[2]):
                    f.vectors[i] = blob
                    f.missing -= 1
                if on_chunks:
                    on_chunks(len(event[1]))
            while order and order[0].missing == 0:
                ready.append(order.popleft())
            if (ready or touches) and first_ready is None:
                first_ready = time.perf_counter()
            finished = done == len(stages)
            rows = len(touches) + sum(len(f.chunks) for f in ready)
            if (ready or touches) and (finished or rows >= COMMIT_ROWS
                                       or time.perf_counter() - first_ready >= COMMIT_S):
                commit()
                first_ready = None
            if finished:
                break
    finally:
        run.stop.set()  # every stage ends at its next look (an encoder after its batch)
        run.encoder_ready.set()
        # the chunker may be in this process's tokenizer, and the model is freed next: wait for it (a
        # file's worth at most); one whose encoder is a server's only holds up Ctrl-C, so not for long
        local = isinstance(run.encoder, Encoder)
        for thread in stages[:2]:
            thread.join(None if local else 1.0)
    assert not order, "every changed file was written"
    summary.files_seen, summary.files_unchanged = run.files_seen, run.unchanged
    summary.failures = [message for _, message in sorted(run.failures)]
    summary.files_failed = len(summary.failures)
    roots = [path_key(Path(p)) for p in paths]
    summary.files_dropped = store.drop_missing(c, run.seen, roots)
    summary.profile = run.profile.report()
    return summary


def _rows(store: EmbeddingStore, c: Collection, f: _File, enc: Callable[[], Encoder]) -> tuple[list, list]:
    """A file's rows and vectors for :meth:`EmbeddingStore.put_file`, inside the writer's transaction:
    the vectors embedded for it, the store's when it was chunked, and those an earlier file of this
    run embedded (written before it, in this transaction or a committed one)."""
    blobs = [f.vectors.get(i) or f.known.get(h) for i, h in enumerate(f.hashes)]
    need = [i for i, b in enumerate(blobs) if b is None]
    if need:
        found = store.known_vectors(c, [f.hashes[i] for i in need])
        lost = [i for i in need if f.hashes[i] not in found]
        # gone since (another process replaced that file): embedded here, as they are few
        again = dict(zip(lost, enc().encode_f16([f.chunks[i].text for i in lost]))) if lost else {}
        for i in need:
            blobs[i] = found.get(f.hashes[i]) or again[i]
    rows = [(f.hashes[i], ch.start_byte, ch.end_byte, ch.start_line, ch.end_line, ch.text)
            for i, ch in enumerate(f.chunks)]
    return rows, blobs
