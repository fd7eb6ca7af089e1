"""`orion fetch` against a Hub-compatible server on 127.0.0.1 serving real GGUFs (the Q4_K_M
from PyPI and its Q8_0 / F16 siblings made with llama.cpp's quantizer)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LADDER_REPO, assert_clean_error

GiB = 1024**3


def blobs(hf_home: Path) -> list[Path]:
    return sorted(p for p in (hf_home / "hub").rglob("blobs/*")) if (hf_home / "hub").exists() else []


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("ram,expected", [("1GB", "Q4_K_M"), ("6GB", "Q8_0"), ("16GB", "F16")])
def test_auto_picks_the_tiers_level(orion, hub, ram, expected, gemma_ladder):
    assert orion("profile", "--ram", ram).returncode == 0
    proc = orion("fetch", LADDER_REPO, "--auto", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"]["file_type"] == expected
    path = Path(data["model"]["path"])
    assert path.exists() and "/snapshots/" in str(path)  # the standard HF cache layout, one copy
    assert sha256(path) == sha256(gemma_ladder[expected])
    # the tier's level caps quality; files above it are refused as such
    verdicts = {c["file_type"]: c["verdict"] for c in data["plan"]["candidates"]}
    assert verdicts[expected] == "chosen"
    if expected != "F16":
        assert "above the tier's level" in verdicts["F16"]
    listed = json.loads(orion("list", "--json").stdout)["models"]
    assert [m["file_type"] for m in listed] == [expected]


def estimate_here(path: Path, n_ctx: int, verdict) -> int:
    """What orion estimates for a file on this machine (its engine settings: repacking, AMX or not)."""
    from orion_cli.engine import settings_for
    from orion_cli.estimate import estimate_memory
    from orion_cli.gguf_header import read_local_header

    return estimate_memory(read_local_header(path), n_ctx, settings_for(verdict)).total_bytes


def test_budget_only_lowers_quality(orion, hub, gemma_ladder, engine_verdict):
    # minimal tier (q16) but a budget that only Q4_K_M fits at this context, from this machine's estimates
    q4, q8 = (estimate_here(gemma_ladder[t], 2048, engine_verdict) for t in ("Q4_K_M", "Q8_0"))
    assert q4 < q8
    budget = f"{(q4 + q8) // 2 >> 20}MiB"
    assert orion("profile", "--ram", "16GB").returncode == 0
    proc = orion("fetch", LADDER_REPO, "--dry-run", "--json", "--ctx", "2048", env={"ORION_MEMORY_BUDGET": budget})
    plan = json.loads(proc.stdout)["plan"]
    assert plan["chosen"].endswith("Q4_K_M.gguf")
    assert [c["file_type"] for c in plan["candidates"]] == ["F16", "Q8_0", "Q4_K_M"]


def test_the_choice_is_dry_run_from_its_header_alone(orion, hub, gemma_ladder, engine_verdict):
    """fetch --auto checks its choice with llama.cpp's dry run of the file's header (a sparse copy of
    the bytes before its tensors, one range request): the figure is the downloaded file's."""
    from orion_cli.engine import LoadSpec, dry_run, header_digest, settings_for
    from orion_cli.estimate import estimate_memory
    from orion_cli.gguf_header import read_local_header

    assert orion("profile", "--ram", "16GB").returncode == 0
    proc = orion("fetch", LADDER_REPO, "--dry-run", "--json", "--ctx", "2048")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    chosen = next(c for c in plan["candidates"] if c["verdict"] == "chosen")
    assert chosen["estimate"]["source"] == "llama.cpp dry run"
    assert all(c["estimate"]["source"] == "formula" for c in plan["candidates"] if c is not chosen)
    local = gemma_ladder[chosen["file_type"]]
    header, settings = read_local_header(local), settings_for(engine_verdict)
    dry = dry_run(LoadSpec(local, 2048, 1, settings=settings), header_digest(local, header.data_offset), use_cache=False)
    assert chosen["estimate_bytes"] == estimate_memory(header, 2048, settings, dry=dry).total_bytes


def test_budget_too_small_for_anything(orion, hub):
    assert orion("profile", "--ram", "256MB").returncode == 0
    proc = orion("fetch", LADDER_REPO)
    assert_clean_error(proc, "no file of", "fits", "budget", code=5)
    assert "needs" in proc.stderr
    assert blobs(Path(os.environ["HF_HOME"])) == []


def test_smaller_context_is_suggested(orion, hub, gemma_ladder, engine_verdict):
    fits = estimate_here(gemma_ladder["Q4_K_M"], 2048, engine_verdict)  # Q4_K_M fits at 2048, not 32768
    assert fits + 16 * 2**20 < estimate_here(gemma_ladder["Q4_K_M"], 32768, engine_verdict)
    assert orion("profile", "--ram", "16GB").returncode == 0
    proc = orion("fetch", LADDER_REPO, "--ctx", "32768", env={"ORION_MEMORY_BUDGET": f"{(fits >> 20) + 8}MiB"})
    assert_clean_error(proc, "fits with --ctx", code=5)


def test_dry_run_downloads_nothing(orion, hub, gemma_ladder):
    assert orion("profile", "--ram", "6GB").returncode == 0
    proc = orion("fetch", LADDER_REPO, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for t in ("Q4_K_M", "Q8_0", "F16", "chosen", "above the tier's level", "KV cache", "weights"):
        assert t in proc.stdout
    assert blobs(Path(os.environ["HF_HOME"])) == []
    total = sum(p.stat().st_size for p in gemma_ladder.values())
    sent = sum(hub.sent(f"gemma-3-270m-{k}.gguf") for k in gemma_ladder)
    assert sent < total * 0.1  # headers only, through range requests


def test_exact_quant_and_level(orion, hub):
    assert orion("profile", "--ram", "16GB").returncode == 0
    data = json.loads(orion("fetch", LADDER_REPO, "--quant", "Q8_0", "--dry-run", "--json").stdout)
    assert data["plan"]["chosen"].endswith("Q8_0.gguf")
    data = json.loads(orion("fetch", LADDER_REPO, "--quant", "q4", "--dry-run", "--json").stdout)
    assert data["plan"]["chosen"].endswith("Q4_K_M.gguf")


def test_kill_during_download_resumes(orion, hub, gemma_ladder, tmp_path):
    """kill -9 in the middle, run again: only the missing bytes travel, and the sha256 matches."""
    name = "gemma-3-270m-F16.gguf"
    size = gemma_ladder["F16"].stat().st_size
    assert orion("profile", "--ram", "16GB").returncode == 0
    hub.rate_bytes_per_s = 40 * 1024**2
    reached = hub.watch(name, 120 * 1024**2)
    env = dict(os.environ, NO_COLOR="1")
    child = subprocess.Popen([sys.executable, "-m", "orion_cli", "fetch", LADDER_REPO],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert reached.wait(timeout=120), "the download never reached 120 MiB"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    partials = list(Path(os.environ["HF_HOME"]).rglob("*.orion-partial"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert kept >= 100 * 1024**2
    first_run = hub.sent(name)

    hub.rate_bytes_per_s = None
    proc = orion("fetch", LADDER_REPO, "--json")
    assert proc.returncode == 0, proc.stderr
    second_run = hub.sent(name) - first_run
    headers_allowance = 32 * 1024**2  # the header reads of planning
    assert second_run <= size - kept + headers_allowance
    path = Path(json.loads(proc.stdout)["model"]["path"])
    assert sha256(path) == sha256(gemma_ladder["F16"])
    assert list(Path(os.environ["HF_HOME"]).rglob("*.orion-partial")) == []
    ranged = [r for m, p, r in hub.requests if m == "GET" and p.endswith(name) and r and not r.startswith("bytes=0-")]
    assert any(r == f"bytes={kept}-" for r in ranged)


def test_corrupted_transfer_is_refused_and_removed(orion, hub, gemma_ladder, tmp_path):
    # the server states a wrong sha256 for the file: orion must refuse it and keep nothing
    hub.add_file("orion-test/bad", "bad-Q4_K_M.gguf", gemma_ladder["Q4_K_M"], sha256="0" * 64)
    assert orion("profile", "--ram", "16GB").returncode == 0
    proc = orion("fetch", "orion-test/bad")
    assert_clean_error(proc, "arrived corrupted", code=6)
    assert blobs(Path(os.environ["HF_HOME"])) == []


def test_missing_repo(orion, hub):
    assert_clean_error(orion("fetch", "nobody/nothing-GGUF"), "no repository nobody/nothing-GGUF", code=4)


def test_missing_quant(orion, hub):
    proc = orion("fetch", LADDER_REPO, "--quant", "Q5_K_M")
    assert_clean_error(proc, "no Q5_K_M file", "Q4_K_M", code=4)


def test_bad_quant_name(orion, hub):
    assert_clean_error(orion("fetch", LADDER_REPO, "--quant", "Q9"), "--quant 'Q9' is not a quantization", code=2)


def test_no_gguf_in_repo(orion, hub, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 64)
    hub.add_file("orion-test/no-gguf", "model.safetensors", f)
    assert_clean_error(orion("fetch", "orion-test/no-gguf"), "has no GGUF model file", code=4)


def test_missing_file_in_repo(orion, hub):
    assert_clean_error(orion("fetch", f"{LADDER_REPO}/nope.gguf"), "no file nope.gguf", code=4)


def test_offline_with_nothing_cached(orion, hub):
    proc = orion("fetch", LADDER_REPO, env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(proc, "HF_HUB_OFFLINE", code=6)


def test_unreachable_hub(orion, hub):
    proc = orion("fetch", LADDER_REPO, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_clean_error(proc, "cannot reach the Hub", code=6)


def test_unknown_name(orion, hub):
    assert_clean_error(orion("fetch", "mistrall"), "unknown model 'mistrall'", "did you mean 'mistral'", code=4)


def test_disk_too_small(hub, monkeypatch, gemma_ladder, orion_home):
    """Free disk below the file size: refused before a byte is written, nothing left in the cache."""
    import shutil

    from orion_cli import fetch as fetch_mod
    from orion_cli import hub as hub_mod
    from orion_cli.errors import DoesNotFit
    from orion_cli.models import resolve
    from orion_cli.strategy import load_strategy

    strategy = load_strategy({"tier": "minimal", "memory_budget_bytes": 8 * GiB})
    plan = fetch_mod.plan_fetch(resolve(LADDER_REPO), strategy, free_disk_bytes=100 * 1024**2)
    assert plan.chosen is None
    assert all("of disk" in c.verdict for c in plan.candidates)
    assert "disk" in plan.hint
    # what the cache already holds (a partial download to resume, a cached file) needs no room again
    sizes = {c.filename: c.size_bytes for c in plan.candidates}
    resumed = fetch_mod.plan_fetch(resolve(LADDER_REPO), strategy, free_disk_bytes=100 * 1024**2,
                                   on_disk=lambda name: max(0, sizes.get(name, 0) - 90 * 1024**2))
    assert all("of disk" not in c.verdict for c in resumed.candidates) and resumed.chosen is not None
    assert all(c.disk_bytes == min(c.size_bytes, 90 * 1024**2) for c in resumed.candidates)

    # the same check inside the download, when the disk filled up after planning
    plan = fetch_mod.plan_fetch(resolve(LADDER_REPO), strategy)
    real = shutil.disk_usage
    monkeypatch.setattr(hub_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(DoesNotFit, match="more on disk"):
        fetch_mod.fetch(plan)
    assert blobs(Path(os.environ["HF_HOME"])) == []


def test_gpu_prefers_a_file_that_fits_wholly_on_it(hub, gemma_ladder, orion_home):
    """With a GPU, each candidate gets an offload plan; a file that fits wholly in VRAM beats a
    better one that would spill onto the CPU, and the dry run shows layers and VRAM."""
    from rich.console import Console

    from orion_cli.cli._render import candidates_table
    from orion_cli.fetch import plan_fetch
    from orion_cli.models import resolve
    from orion_cli.strategy import load_strategy

    strategy = load_strategy({"tier": "minimal", "memory_budget_bytes": 8 * GiB, "n_gpu_layers": "auto",
                              "gpu_budget_bytes": 8 * GiB})
    wide = plan_fetch(resolve(LADDER_REPO), strategy, gpu_budgets=[64 * GiB])
    assert wide.chosen.file_type == "F16" and wide.chosen.offload.full
    by_type = {c.file_type: c for c in wide.candidates}
    budget = (by_type["Q8_0"].offload.gpu_bytes + by_type["F16"].offload.gpu_bytes) // 2
    plan = plan_fetch(resolve(LADDER_REPO), strategy, gpu_budgets=[budget])
    assert plan.chosen.file_type == "Q8_0" and plan.chosen.offload.full
    f16 = next(c for c in plan.candidates if c.file_type == "F16")
    assert f16.fits and 0 < f16.offload.n_gpu_layers < f16.offload.n_total  # it would run, spilling
    doc = plan.to_dict()
    assert doc["gpu_budgets"] == [budget]
    assert {c["file_type"]: c["offload"]["n_gpu_layers"] for c in doc["candidates"]}["Q8_0"] == f16.offload.n_total
    console = Console(width=200, record=True)
    console.print(candidates_table(plan))
    text = console.export_text()
    assert "GPU layers" in text and "VRAM" in text and f"{f16.offload.n_gpu_layers}/{f16.offload.n_total}" in text
    # no GPU (or n_gpu_layers 0): the plain plan, as before
    cpu = plan_fetch(resolve(LADDER_REPO), load_strategy({"tier": "minimal", "memory_budget_bytes": 8 * GiB}),
                     gpu_budgets=[])
    assert cpu.chosen.file_type == "F16" and cpu.chosen.offload is None
