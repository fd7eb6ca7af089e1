"""EmbeddingStore: collections of chunks and their float16 vectors in plain SQLite.

``$ORION_HOME/embeddings.db``, WAL journal, schema migrations in ``meta``. Per
chunk: its content hash, file path, byte and line offsets, text, and the
vector as real IEEE half precision (2 bytes a value). A file's rows are written
whole in one transaction (``orion embed`` puts many files in one: :meth:`EmbeddingStore.writing`),
so a run killed half-way keeps every file it committed, each with all its rows, and
the next run resumes; several processes may write one store (SQLite's locking,
a busy timeout, ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import InvalidValue, NotFound

SCHEMA_VERSION = 1
MIGRATIONS = {
    1: """
    CREATE TABLE collections (
        id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, model_id TEXT NOT NULL,
        dim INTEGER NOT NULL, created TEXT NOT NULL
    );
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, content_hash TEXT NOT NULL,
        UNIQUE (collection_id, path)
    );
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        file_id INTEGER REFERENCES files(id) ON DELETE CASCADE,
        content_hash TEXT NOT NULL,
        start_byte INTEGER, end_byte INTEGER, start_line INTEGER, end_line INTEGER,
        text TEXT NOT NULL,
        embedding BLOB NOT NULL
    );
    CREATE INDEX chunks_by_file ON chunks(file_id);
    CREATE INDEX chunks_by_hash ON chunks(collection_id, content_hash);
    """,
}


def sql_statements(script: str) -> list[str]:
    """The statements of an SQL script, cut at the ';' where SQLite says a statement is complete
    (a ';' inside a string or a trigger's body does not end one)."""
    out, start = [], 0
    for end, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start: end + 1]):
            out.append(script[start: end + 1].strip())
            start = end + 1
    if script[start:].strip():
        out.append(script[start:].strip())
    return [s for s in out if s.strip(" ;\n")]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    model_id: str
    dim: int
    created: str


@dataclass(frozen=True)
class ChunkRow:
    path: str | None
    start_line: int | None
    end_line: int | None
    start_byte: int | None
    end_byte: int | None
    content_hash: str
    text: str


class EmbeddingStore:
    def __init__(self, path: Path, *, busy_timeout_s: float = 60.0, migrate: bool = True) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._matrix_cache: dict[int, tuple[tuple[int, int], object, list[int]]] = {}
        self._writes = 0  # this connection's committed writes (SQLite's data_version counts the others')
        if migrate:
            self._migrate()

    def close(self) -> None:
        self.db.close()

    def reader(self) -> EmbeddingStore:
        """Another connection to this store, for a thread's reads (WAL: it reads the committed state
        while this one writes); its owner closes it."""
        return EmbeddingStore(self.path, busy_timeout_s=self.busy_timeout_s, migrate=False)

    # ------------------------------------------------------------ schema

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, the only way the store writes several statements: ``BEGIN
        IMMEDIATE`` (waiting up to the busy timeout for another writer; past it, an error saying
        the store is locked, and nothing written), ``COMMIT``, or ``ROLLBACK`` on any exception,
        Ctrl-C included."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            from .errors import from_sqlite_error

            raise from_sqlite_error(exc, self.path) from exc
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._writes += 1

    def _migrate(self) -> None:
        with self._write():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise InvalidValue(f"{self.path} was written by a newer orion (schema {version})",
                                   hint="upgrade orion, or use another ORION_HOME")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                # executescript would commit the open transaction: run the statements one by one
                for statement in sql_statements(MIGRATIONS[v]):
                    self.db.execute(statement)
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(v),))

    # ------------------------------------------------------------ collections

    def collection(self, name: str, *, model_id: str | None = None, dim: int | None = None) -> Collection:
        """The collection ``name``; created when ``model_id`` and ``dim`` are given and it is new."""
        row = self.db.execute("SELECT id, name, model_id, dim, created FROM collections WHERE name=?",
                              (name,)).fetchone()
        if row is None and model_id is not None:
            from ._fs import now_iso

            self.db.execute("INSERT OR IGNORE INTO collections (name, model_id, dim, created) VALUES (?,?,?,?)",
                            (name, model_id, dim, now_iso()))
            row = self.db.execute("SELECT id, name, model_id, dim, created FROM collections WHERE name=?",
                                  (name,)).fetchone()
        if row is None:
            names = ", ".join(c.name for c in self.collections()) or "none yet"
            raise NotFound(f"no collection {name!r}", hint=f"collections here: {names}; make one with 'orion embed'")
        c = Collection(*row)
        if model_id is not None and c.model_id != model_id:
            raise InvalidValue(f"collection {name!r} was made with {c.model_id}, not {model_id}",
                               hint=f"use --model {c.model_id}, or another --collection")
        return c

    def collections(self) -> list[Collection]:
        return [Collection(*r) for r in self.db.execute(
            "SELECT id, name, model_id, dim, created FROM collections ORDER BY name")]

    def stats(self, c: Collection) -> dict:
        files = self.db.execute("SELECT COUNT(*) FROM files WHERE collection_id=?", (c.id,)).fetchone()[0]
        chunks, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(embedding)), 0) FROM chunks "
                                       "WHERE collection_id=?", (c.id,)).fetchone()
        return {"name": c.name, "model": c.model_id, "dim": c.dim, "files": files, "chunks": chunks,
                "vector_bytes": size, "created": c.created}

    def drop(self, name: str) -> None:
        c = self.collection(name)
        with self._write():
            self.db.execute("DELETE FROM chunks WHERE collection_id=?", (c.id,))
            self.db.execute("DELETE FROM files WHERE collection_id=?", (c.id,))
            self.db.execute("DELETE FROM collections WHERE id=?", (c.id,))

    # ------------------------------------------------------------ files

    def file_state(self, c: Collection, path: str) -> tuple[int, int, str] | None:
        row = self.db.execute("SELECT size, mtime_ns, content_hash FROM files WHERE collection_id=? AND path=?",
                              (c.id, path)).fetchone()
        return tuple(row) if row else None

    def touch_file(self, c: Collection, path: str, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE files SET size=?, mtime_ns=? WHERE collection_id=? AND path=?",
                        (size, mtime_ns, c.id, path))

    def known_vectors(self, c: Collection, hashes: Iterable[str]) -> dict[str, bytes]:
        """Stored vectors for content hashes already in the collection (any file)."""
        out: dict[str, bytes] = {}
        hashes = list(set(hashes))
        for i in range(0, len(hashes), 500):
            part = hashes[i : i + 500]
            q = f"SELECT content_hash, embedding FROM chunks WHERE collection_id=? AND content_hash IN " \
                f"({','.join('?' * len(part))})"
            for h, blob in self.db.execute(q, (c.id, *part)):
                out[h] = blob
        return out

    def replace_file(self, c: Collection, path: str, size: int, mtime_ns: int, file_hash: str,
                     rows: Sequence[tuple], vectors: Sequence[bytes]) -> None:
        """One file's chunks, all at once, in a transaction of its own (see :meth:`put_file`)."""
        with self.writing(c):
            self.put_file(c, path, size, mtime_ns, file_hash, rows, vectors)

    @contextmanager
    def writing(self, c: Collection) -> Iterator[None]:
        """One transaction for the writes of many files (:meth:`put_file`, :meth:`touch_file`):
        committed whole, or rolled back whole on any exception (Ctrl-C included)."""
        with self._write():
            if self.db.execute("SELECT 1 FROM collections WHERE id=?", (c.id,)).fetchone() is None:
                raise NotFound(f"collection {c.name!r} was deleted while it was being embedded",
                               hint="nothing more was written to it; run the same 'orion embed' to make it anew")
            yield

    def put_file(self, c: Collection, path: str, size: int, mtime_ns: int, file_hash: str,
                 rows: Sequence[tuple], vectors: Sequence[bytes]) -> None:
        """One file's chunks in place of its old ones, inside :meth:`writing`: ``rows`` are
        (content_hash, start_byte, end_byte, start_line, end_line, text); ``vectors`` float16 blobs
        in the same order."""
        if not self.db.in_transaction:
            raise RuntimeError("put_file writes inside EmbeddingStore.writing()")
        self.db.execute("INSERT INTO files (collection_id, path, size, mtime_ns, content_hash) VALUES (?,?,?,?,?) "
                        "ON CONFLICT (collection_id, path) DO UPDATE SET size=excluded.size, "
                        "mtime_ns=excluded.mtime_ns, content_hash=excluded.content_hash",
                        (c.id, path, size, mtime_ns, file_hash))
        file_id = self.db.execute("SELECT id FROM files WHERE collection_id=? AND path=?",
                                  (c.id, path)).fetchone()[0]
        self.db.execute("DELETE FROM chunks WHERE file_id=?", (file_id,))
        self.db.executemany(
            "INSERT INTO chunks (collection_id, file_id, content_hash, start_byte, end_byte, start_line, "
            "end_line, text, embedding) VALUES (?,?,?,?,?,?,?,?,?)",
            [(c.id, file_id, *row, blob) for row, blob in zip(rows, vectors)],
        )

    def drop_missing(self, c: Collection, keep: set[str], under: Sequence[str]) -> int:
        """Forget files under ``under`` (path prefixes) that are not in ``keep``; returns how many."""
        rows = self.db.execute("SELECT id, path FROM files WHERE collection_id=?", (c.id,)).fetchall()
        gone = [fid for fid, p in rows if p not in keep and any(p == u or p.startswith(u.rstrip("/") + "/")
                                                                 for u in under)]
        if gone:
            with self._write():
                self.db.executemany("DELETE FROM files WHERE id=?", [(g,) for g in gone])
        return len(gone)

    # ------------------------------------------------------------ search

    def matrix(self, c: Collection):
        """(float32 matrix of every vector, chunk ids), cached while the store is unchanged: no write
        committed since, by this connection or another process (SQLite's ``data_version``). Row counts
        and ids do not tell: replacing the last file reuses its row ids."""
        import numpy as np

        version = (self._writes, self.db.execute("PRAGMA data_version").fetchone()[0])
        cached = self._matrix_cache.get(c.id)
        if cached and cached[0] == version:
            return cached[1], cached[2]
        ids, blobs = [], []
        for cid, blob in self.db.execute("SELECT id, embedding FROM chunks WHERE collection_id=? ORDER BY id",
                                         (c.id,)):
            ids.append(cid)
            blobs.append(blob)
        if blobs:
            m = np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), c.dim).astype(np.float32)
        else:
            m = np.zeros((0, c.dim), dtype=np.float32)
        self._matrix_cache[c.id] = (version, m, ids)
        return m, ids

    def chunk_rows(self, ids: Sequence[int]) -> list[ChunkRow]:
        q = (f"SELECT c.id, f.path, c.start_line, c.end_line, c.start_byte, c.end_byte, c.content_hash, c.text "
             f"FROM chunks c LEFT JOIN files f ON f.id = c.file_id WHERE c.id IN ({','.join('?' * len(ids))})")
        rows = {r[0]: ChunkRow(*r[1:]) for r in self.db.execute(q, tuple(ids))}
        return [rows[i] for i in ids]


def search(store: EmbeddingStore, c: Collection, query_vector, k: int = 5) -> list[tuple[float, ChunkRow]]:
    """The k best chunks by cosine similarity: one matrix-vector product over the whole collection."""
    import numpy as np

    m, ids = store.matrix(c)
    if not ids:
        return []
    scores = m @ np.asarray(query_vector, dtype=np.float32)
    k = min(k, len(ids))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top])]
    rows = store.chunk_rows([ids[i] for i in top])
    return [(float(scores[i]), row) for i, row in zip(top, rows)]
