"""The memory estimate on architectures orion was not fitted to: random-weight GGUFs of 9
architectures (tests/arch_models.py: llama with GQA, qwen2 with biases, qwen3, gemma3 and gemma2
with sliding windows, phi3, a long-context yarn llama, a qwen3 mixture of experts, a BERT encoder),
loaded through orion's engine on this CPU with the context filled, against the estimate for the
same settings: llama.cpp's dry run for the buffers, the formula alone for what-ifs. bench/estimate.py
runs the larger table (and the GPU one); this is the make-test size."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from arch_models import SMALL, write_model
from orion_cli.engine import LoadSpec, dry_run, header_digest, settings_for
from orion_cli.engine.dryrun import parse_log, sparse_copy
from orion_cli.engine.settings import kv_settings
from orion_cli.estimate import estimate_memory
from orion_cli.gguf_header import read_local_header

MiB = 1024**2
PROBE = Path(__file__).parent / "memory_probe.py"
LLM_CELLS = [(arch, n_ctx, kv) for arch in SMALL if arch != "bert" for n_ctx in (512, 2048) for kv in ("f16", "q8_0")]
ENCODER_CELLS = [("bert", n_ctx, "f16") for n_ctx in (128, 512)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("arch")
    out = {}
    for arch, shape in SMALL.items():
        shape = dict(shape)
        out[arch] = write_model(folder / f"{arch}.gguf", shape.pop("arch"), **shape)
    return out


def settings(engine_verdict, arch: str, kv: str):
    if arch == "bert":
        return settings_for(engine_verdict, embedding=True)
    return kv_settings(settings_for(engine_verdict), kv, kv)


def probe(path: Path, n_ctx: int, kv: str, embedding: bool) -> dict:
    req = {"path": str(path), "n_ctx": n_ctx, "type_k": kv, "type_v": kv, "embedding": embedding, "threads": 2}
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps(req)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,n_ctx,kv", LLM_CELLS + ENCODER_CELLS)
def test_estimate_within_10_percent_of_resident_growth(models, engine_verdict, arch, n_ctx, kv):
    path = models[arch]
    header = read_local_header(path)
    s = settings(engine_verdict, arch, kv)
    embedding = arch == "bert"
    dry = dry_run(LoadSpec(path, n_ctx, 2, embedding=embedding, settings=s), header_digest(path, header.data_offset))
    exact = estimate_memory(header, n_ctx, s, dry=dry)
    formula = estimate_memory(header, n_ctx, s)
    measured = probe(path, n_ctx, kv, embedding)["filled_bytes"]
    error, formula_error = (exact.total_bytes - measured) / measured, (formula.total_bytes - measured) / measured
    print(f"{arch} n_ctx {n_ctx} {kv}: measured {measured / MiB:.1f} MiB, dry run {exact.total_bytes / MiB:.1f} "
          f"({error:+.1%}), formula {formula.total_bytes / MiB:.1f} ({formula_error:+.1%})")
    assert exact.source == "llama.cpp dry run" and formula.source == "formula"
    assert abs(error) <= 0.10
    assert abs(formula_error) <= 0.10


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_the_kv_cache_is_what_llama_cpp_reports(models, engine_verdict, kv):
    """Every layer layout (GQA, sliding windows, head sizes that are not n_embd / n_head), every KV
    type: the formula's KV cache is the size llama.cpp's dry run reports (logged in MiB with 2 decimals)."""
    for arch, path in models.items():
        if arch == "bert":
            continue
        header = read_local_header(path)
        for n_ctx in (512, 4096):
            s = settings(engine_verdict, arch, kv)
            dry = dry_run(LoadSpec(path, n_ctx, 1, settings=s), header_digest(path, header.data_offset))
            assert abs(estimate_memory(header, n_ctx, s).kv_bytes - dry.kv_bytes) <= 0.0101 * MiB, (arch, n_ctx)  # its log rounds each cache to 0.01 MiB


def test_a_header_only_sparse_file_gets_the_same_dry_run(gemma_q4, engine_verdict, tmp_path):
    """What fetch and inspect do for a file on the Hub: its header bytes in a sparse file of the real
    size; llama.cpp reads no weight in a dry run, so its figures are those of the downloaded file."""
    header = read_local_header(gemma_q4)
    with open(gemma_q4, "rb") as f:
        head = f.read(header.data_offset)
    sparse = sparse_copy(head, gemma_q4.stat().st_size, tmp_path / "header-only.gguf")
    assert sparse.stat().st_size == gemma_q4.stat().st_size
    assert sparse.stat().st_blocks * 512 < 2 * header.data_offset + (1 << 20)  # nothing written past the header
    s = settings_for(engine_verdict)
    digest = header_digest(gemma_q4, header.data_offset)
    assert header_digest(sparse, header.data_offset) == digest
    real = dry_run(LoadSpec(gemma_q4, 4096, 2, settings=s), digest, use_cache=False)
    copy = dry_run(LoadSpec(sparse, 4096, 2, settings=s), digest, use_cache=False)
    assert real.to_dict() == copy.to_dict()
    assert real.compute["CPU"] > 0 and real.kv_bytes > 0


def test_dry_runs_are_cached_by_header_and_settings(models, engine_verdict, monkeypatch):
    path = models["llama"]
    header = read_local_header(path)
    spec = LoadSpec(path, 1024, 2, settings=settings_for(engine_verdict))
    digest = header_digest(path, header.data_offset)
    first = dry_run(spec, digest)
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert dry_run(replace(spec, threads=7), digest) == first  # threads change no buffer: the cached figures
    assert not calls
    bigger = dry_run(replace(spec, n_ctx=4096), digest)  # another context: another dry run
    assert len(calls) == 1 and bigger.kv_bytes == 4 * first.kv_bytes


def test_a_log_without_figures_is_no_dry_run():
    log = "llama_context: n_ctx = 512\nsched_reserve:        CPU compute buffer size =    14.51 MiB\n"
    assert parse_log(log).compute == {"CPU": round(14.51 * MiB)}
    assert parse_log("nothing here").compute == {}


def test_a_sparse_copy_that_cannot_be_had_leaves_the_formula(tmp_path, monkeypatch):
    """A cache that cannot be written (here: a file where its folder should be) gives no sparse copy:
    inspect and fetch keep the formula's figures rather than fail."""
    from orion_cli.engine import dryrun

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(dryrun, "cache_dir", lambda: blocker / "dryrun")
    assert dryrun.cached_sparse_copy(b"GGUF" + bytes(60), 1 << 30) is None
    monkeypatch.setattr(dryrun, "cache_dir", lambda: tmp_path / "dryrun")
    copy = dryrun.cached_sparse_copy(b"GGUF" + bytes(60), 1 << 30)
    assert copy is not None and copy.stat().st_size == 1 << 30
    with open(copy, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_what_a_decode_adds_leaves_out_what_the_load_holds(models, engine_verdict):
    """The ledger measures right after a load and adds ``fill_bytes`` (what a decode makes resident):
    the output buffer (cleared by llama.cpp at the start) and CUDA's pinned host buffers (resident once
    allocated) are already in the measure, so they are not in it."""
    from orion_cli.engine import DryRun

    header = read_local_header(models["llama"])
    s = settings_for(engine_verdict)
    plain = estimate_memory(header, 2048, s, dry=DryRun(compute={"CPU": 10 * MiB}, output={"CPU": MiB}))
    assert plain.compute_at_load_bytes == MiB and plain.fill_bytes == plain.compute_bytes - MiB
    pinned = estimate_memory(header, 2048, s, dry=DryRun(compute={"CPU": 10 * MiB, "CUDA_Host": 5 * MiB},
                                                         output={"CUDA_Host": MiB}))
    assert pinned.compute_bytes == plain.compute_bytes + 5 * MiB
    assert pinned.fill_bytes == plain.fill_bytes  # the pinned compute buffer is resident at load
