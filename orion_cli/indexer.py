"""`orion embed`'s work: files -> chunks -> vectors in the store, skipping what did not change."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .embeddings import Encoder, WalkReport, walk
from .store import EmbeddingStore, content_hash


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
    changed, so a re-run over an unchanged corpus never loads the model.
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
    report = walk(paths, hidden=hidden)
    summary.walk = report
    seen: set[str] = set()
    for path in report.files:
        key = path_key(path)
        seen.add(key)
        summary.files_seen += 1
        try:
            st = path.stat()
            state = store.file_state(c, key)
            if state and state[0] == st.st_size and state[1] == st.st_mtime_ns:
                summary.files_unchanged += 1
                continue
            data = path.read_bytes()
            file_hash = hashlib.sha256(data).hexdigest()
            if state and state[2] == file_hash:
                store.touch_file(c, key, st.st_size, st.st_mtime_ns)
                summary.files_unchanged += 1
                continue
            text = data.decode("utf-8", errors="replace")
            encoder_now = enc()
            chunks = encoder_now.chunks(text)
            hashes = [content_hash(ch.text) for ch in chunks]
            known = store.known_vectors(c, hashes)
            todo = [i for i, h in enumerate(hashes) if h not in known]
            if on_file:
                on_file(path, len(todo))
            vectors: dict[int, bytes] = {}
            if todo:
                rows = encoder_now.encode_f16([chunks[i].text for i in todo], on_done=on_chunks)
                vectors = dict(zip(todo, rows))
            blobs = [vectors[i] if i in vectors else known[hashes[i]] for i in range(len(chunks))]
            rows = [(hashes[i], ch.start_byte, ch.end_byte, ch.start_line, ch.end_line, ch.text)
                    for i, ch in enumerate(chunks)]
            store.replace_file(c, key, st.st_size, st.st_mtime_ns, file_hash, rows, blobs)
            summary.files_embedded += 1
            summary.chunks_embedded += len(todo)
            summary.chunks_reused += len(chunks) - len(todo)
        except OSError as exc:
            summary.files_failed += 1
            summary.failures.append(f"{path}: {exc.strerror or exc}")
    roots = [path_key(Path(p)) for p in paths]
    summary.files_dropped = store.drop_missing(c, seen, roots)
    return summary
