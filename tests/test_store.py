"""The store's one write helper: a transaction or nothing; a lock held by another process is a
clear error, never a write outside a transaction; migrations split as SQLite parses them."""

from __future__ import annotations

import sqlite3

import pytest

from orion_cli.errors import OrionError
from orion_cli.store import EmbeddingStore, sql_statements


def _rows(store):
    return store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0], \
        store.db.execute("SELECT COUNT(*) FROM files").fetchone()[0]


def test_a_lock_held_by_another_process_is_an_error_and_nothing_is_written(tmp_path):
    store = EmbeddingStore(tmp_path / "s.db", busy_timeout_s=0.2)
    c = store.collection("c", model_id="m@f16", dim=2)
    other = sqlite3.connect(str(tmp_path / "s.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another orion writing
    with pytest.raises(OrionError, match="locked by another orion process"):
        store.replace_file(c, "a.txt", 1, 1, "h", [("h1", 0, 1, 1, 1, "a")], [b"\0\0\0\0"])
    other.execute("ROLLBACK")
    assert _rows(store) == (0, 0) and not store.db.in_transaction
    store.replace_file(c, "a.txt", 1, 1, "h", [("h1", 0, 1, 1, 1, "a")], [b"\0\0\0\0"])
    assert _rows(store) == (1, 1)


def test_an_interrupt_inside_a_write_rolls_it_back(tmp_path):
    store = EmbeddingStore(tmp_path / "s.db")
    c = store.collection("c", model_id="m@f16", dim=2)

    class Vectors(list):
        def __iter__(self):  # Ctrl-C while the rows are being written
            yield b"\0\0\0\0"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.replace_file(c, "a.txt", 1, 1, "h", [("h1", 0, 1, 1, 1, "a"), ("h2", 1, 2, 1, 1, "b")], Vectors())
    assert _rows(store) == (0, 0) and not store.db.in_transaction


def test_sql_statements_respect_strings_and_triggers():
    script = ("CREATE TABLE t (a TEXT DEFAULT ';');\n"
              "CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO t VALUES ('x;y'); END;\n"
              "INSERT INTO t VALUES ('1; 2')")
    parts = sql_statements(script)
    assert len(parts) == 3 and parts[1].endswith("END;")
    db = sqlite3.connect(":memory:")
    for part in parts:
        db.execute(part)


def _vec(*values):
    import numpy as np

    return np.array(values, dtype=np.float16).tobytes()


def test_search_sees_a_replaced_last_file(tmp_path):
    """Replacing the last file reuses its row ids (same count, same max id): a long-lived process (the
    server, a REPL) must still search the new vectors. (Before: the cache keyed on (count, max id)
    answered with the old ones.)"""
    from orion_cli.store import search

    store = EmbeddingStore(tmp_path / "s.db")
    c = store.collection("c", model_id="m@f16", dim=2)
    store.replace_file(c, "a.txt", 1, 1, "ha", [("a1", 0, 1, 1, 1, "a")], [_vec(1, 0)])
    store.replace_file(c, "b.txt", 1, 1, "hb", [("b1", 0, 1, 1, 1, "old b")], [_vec(0, 1)])
    assert search(store, c, [0, 1], k=1)[0][1].text == "old b"
    store.replace_file(c, "b.txt", 2, 2, "hb2", [("b2", 0, 1, 1, 1, "new b")], [_vec(-1, 0)])
    assert store.db.execute("SELECT MAX(id), COUNT(*) FROM chunks").fetchone() == (2, 2)  # ids reused
    (score, best), = search(store, c, [-1, 0], k=1)
    assert best.text == "new b" and score > 0.99


def test_search_sees_another_processs_write(tmp_path):
    from orion_cli.store import search

    store = EmbeddingStore(tmp_path / "s.db")
    c = store.collection("c", model_id="m@f16", dim=2)
    store.replace_file(c, "a.txt", 1, 1, "ha", [("a1", 0, 1, 1, 1, "a")], [_vec(1, 0)])
    assert search(store, c, [1, 0], k=1)[0][1].text == "a"
    other = EmbeddingStore(tmp_path / "s.db")  # another connection: another orion process
    other.replace_file(other.collection("c"), "a.txt", 2, 2, "ha2", [("a2", 0, 1, 1, 1, "a again")], [_vec(0, 1)])
    (score, best), = search(store, c, [0, 1], k=1)
    assert best.text == "a again" and score > 0.99
