"""`orion eval --kld`: KL divergence against a reference, checked against llama.cpp's definitions
computed here independently, on the real Gemma 3 270M (its Q4_K_M file, and that file quantized
with llama.cpp to F16, Q8_0 and Q2_K: the F16 "reference" carries the Q4_K_M's weights)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS_DIR, assert_clean_error

CTX = 64  # four windows of the short text: 4 x 31 = 124 positions scored (llama.cpp asks for 100)
WINDOWS = 4


@pytest.fixture(scope="session")
def gemma_q2k(gemma_q4) -> Path:
    from orion_cli.engine import quantize_command

    out = MODELS_DIR / "gemma-3-270m-Q2_K.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        done = subprocess.run(quantize_command(gemma_q4, tmp, "Q2_K", 2, allow_requantize=True),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        assert done.returncode == 0, "quantizing to Q2_K failed"
        tmp.rename(out)
    return out


@pytest.fixture
def short_text(tmp_path) -> Path:
    text = (Path(__file__).parents[1] / "profiles" / "eval-python-docs.txt").read_text(encoding="utf-8")[:1100]
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    return path


def seed_ladder_cache(src: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Put files made from ``src`` by llama.cpp's quantizer (the session's, made as `eval --ladder`
    makes them) where `eval --ladder` keeps them, so the test does not quantize again."""
    from orion_cli.quantize import quant_cache_path

    seeded = {}
    for type_name, path in files.items():
        dst = quant_cache_path(src, type_name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, dst)
        seeded[type_name] = dst
    return seeded


def independent_kld(reference: Path, candidates: dict[str, Path], text: str, n_ctx: int, engine_verdict) -> dict:
    """llama.cpp's KL-divergence statistics (perplexity.cpp), written again from its definitions over
    the models' saved logits in float64, without its uint16 storage: windows of n_ctx tokens from BOS,
    the logits at n_ctx/2 .. n_ctx-2 scored; KLD sums p_ref (log p_ref - log p) over the tokens whose
    log p_ref > -16; the percentile is linear between the nearest (numpy's default, as llama.cpp's)."""
    from orion_cli.engine import peer_llama

    kw = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False, n_threads=2,
              swa_full=False)
    models = {name: peer_llama(path, check=engine_verdict, **kw) for name, path in {"ref": reference, **candidates}.items()}
    tokens = models["ref"].tokenize(text.encode(), add_bos=True, special=True)
    stats = {name: {"kld": [], "same": [], "nll": [], "nll_base": []} for name in candidates}

    def log_softmax(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        return rows - top - np.log(np.exp(rows - top).sum(axis=1, keepdims=True))

    for w in range(len(tokens) // n_ctx):
        window = tokens[w * n_ctx:(w + 1) * n_ctx]
        window[0] = tokens[0]
        saved = {}
        for name, llm in models.items():
            llm.reset()
            llm.eval(window)
            saved[name] = np.array(llm.scores[n_ctx // 2:n_ctx - 1], dtype=np.float32)  # the saved logits
        lp_ref = log_softmax(saved["ref"])
        p_ref = np.where(lp_ref > -16, np.exp(lp_ref), 0.0)
        nxt = np.array(window[n_ctx // 2 + 1:])
        rows = np.arange(len(nxt))
        for name, st in stats.items():
            lp = log_softmax(saved[name])
            st["kld"] += list((p_ref * (lp_ref - lp)).sum(axis=1))
            st["same"] += list(saved["ref"].argmax(axis=1) == saved[name].argmax(axis=1))
            st["nll"] += list(-lp[rows, nxt])
            st["nll_base"] += list(-lp_ref[rows, nxt])
    for llm in models.values():
        llm.close()
    return {name: {"kld_mean": float(np.mean(st["kld"])), "kld_p99": float(np.percentile(st["kld"], 99)),
                   "same_top": float(np.mean(st["same"])), "scored_tokens": len(st["kld"]),
                   "delta_perplexity": float(np.exp(np.mean(st["nll"])) - np.exp(np.mean(st["nll_base"])))}
            for name, st in stats.items()}


def test_kld_ladder_q8_far_below_q2k_and_independent_check(orion, gemma_ladder, gemma_q2k, short_text,
                                                          engine_verdict):
    src = gemma_ladder["Q4_K_M"]
    cached = seed_ladder_cache(src, {"F16": gemma_ladder["F16"], "Q8_0": gemma_ladder["Q8_0"], "Q2_K": gemma_q2k})
    proc = orion("eval", str(src), "--kld", "--ladder", "Q8_0,Q2_K", "--text", str(short_text),
                 "--ctx", str(CTX), "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    # no --against: the highest-precision file of the model here, its F16 (in the ladder's cache)
    assert Path(doc["reference"]["path"]) == cached["F16"]
    rows = {r["file_type"]: r for r in doc["results"]}
    assert list(rows) == ["Q8_0", "Q2_K"]
    for r in rows.values():
        assert r["scored_tokens"] == WINDOWS * (CTX - 1 - CTX // 2) and r["chunks"] == WINDOWS
    q8, q2 = rows["Q8_0"], rows["Q2_K"]
    assert 0 < q8["kld_mean"] * 10 < q2["kld_mean"]  # Q8_0 far closer to the reference than Q2_K
    assert q8["kld_p99"] < q2["kld_p99"] and q8["same_top"] > q2["same_top"]
    assert q2["delta_perplexity"] > 0 and q2["perplexity"] > q2["perplexity_base"]
    assert q8["kld_p99"] <= q8["kld_p999"] <= q8["kld_max"]

    theirs = independent_kld(gemma_ladder["F16"], {"Q8_0": gemma_ladder["Q8_0"], "Q2_K": gemma_q2k},
                             short_text.read_text(encoding="utf-8"), CTX, engine_verdict)
    for name, mine in rows.items():
        assert theirs[name]["scored_tokens"] == mine["scored_tokens"]
        for key in ("kld_mean", "kld_p99", "same_top"):
            assert mine[key] == pytest.approx(theirs[name][key], rel=0.01), (name, key, mine[key], theirs[name][key])
    # Q8_0's Δppl is within its uncertainty of 0 (1 % of it is below the uint16 rounding): Q2_K's is checked
    assert q2["delta_perplexity"] == pytest.approx(theirs["Q2_K"]["delta_perplexity"], rel=0.01)

    # each row recorded in $ORION_HOME/quality.json, which 'list', 'inspect' and 'fetch --max-kld' read
    from orion_cli.gguf_header import read_local_header
    from orion_cli.quality import QualityBook, quality_of

    for t, path in (("Q8_0", cached["Q8_0"]), ("Q2_K", cached["Q2_K"])):
        q = quality_of(read_local_header(path), "f16")
        assert q.source == "measured" and q.kld == rows[t]["kld_mean"], t
        assert q.record.reference == cached["F16"].name and q.record.text == short_text.name
        assert q.record.positions == rows[t]["scored_tokens"] and q.record.same_top == rows[t]["same_top"]
    assert len(QualityBook().records()) == 2
    assert not list((Path(os.environ["ORION_HOME"]) / "cache").glob("kld-*"))  # its folder went with it


def test_kld_kv_types_ordered_and_self_is_zero(orion, gemma_ladder, short_text):
    q8 = gemma_ladder["Q8_0"]
    proc = orion("eval", str(q8), "--kld", "--against", str(q8), "--kv-type", "f16,q8_0,q4_0",
                 "--text", str(short_text), "--ctx", str(CTX), "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["kv_type"]: r for r in json.loads(proc.stdout)["results"]}
    assert list(rows) == ["f16", "q8_0", "q4_0"]
    # the file against itself (f16 KV, the reference's settings): 0, to llama.cpp's uint16 rounding of
    # log-probabilities (16 nats in 65,535 steps), and the same top token everywhere
    same = rows["f16"]
    assert same["kld_mean"] < 1e-5 and same["kld_p999"] < 1e-3
    assert same["same_top"] == 1.0 and abs(same["delta_perplexity"]) < 1e-3
    kld = {k: r["kld_mean"] for k, r in rows.items()}
    assert kld["f16"] < 1e-5 < kld["q8_0"] < kld["q4_0"]  # coarser caches, further from the reference
    assert len({r["kld_p99"] for r in rows.values()}) == 3
    assert [r["flash_attn"] for r in rows.values()] == [False, True, True]  # llama.cpp quantizes V only with it
    assert rows["q4_0"]["same_top"] < 1.0
    from orion_cli.gguf_header import read_local_header
    from orion_cli.quality import quality_of

    header = read_local_header(q8)
    assert {kv: quality_of(header, kv).kld for kv in rows} == kld  # a record per KV type


def test_kld_nothing_to_compare(orion, gemma_ladder, short_text):
    """Nothing to compare (the model is its own highest-precision file here): one line, exit 2, no run."""
    q8 = gemma_ladder["Q8_0"]
    assert_clean_error(orion("eval", str(q8), "--kld", "--text", str(short_text)), "nothing to compare", code=2)


@pytest.mark.parametrize("args, fragment", [
    (["--kv-type", "q8_0"], "needs --kld"),
    (["--against", "F16"], "needs --kld"),
    (["--kld", "--kv-type", "q5_1"], "not a KV-cache type"),
    (["--kld", "--against", "no-such-model.gguf"], "no such file"),
])
def test_kld_bad_input(orion, gemma_ladder, args, fragment):
    assert_clean_error(orion("eval", str(gemma_ladder["Q8_0"]), *args), fragment, code=2 if "such" not in fragment else 4)
