"""The vision path end to end. No real vision GGUF can be installed here, so this test writes a
tiny LLaVA-style projector with RANDOM WEIGHTS (a CLIP ViT with the 'mlp' projector of LLaVA 1.5,
keys and tensor names as llama.cpp's mtmd/clip loader expects them) whose output size matches the
real gemma3-270m's embedding size (640). The answers are therefore meaningless: the test checks
that the image is encoded, that its tokens enter the context, and that generation returns."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error
from test_run import tiny_png

IMAGE_SIZE, PATCH = 28, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # the CLS position is dropped by the LLaVA projector


def write_random_llava_projector(path: Path, *, text_embd: int = 640, n_embd: int = 64, n_ff: int = 128,
                                 n_layer: int = 2, n_head: int = 4, hidden: int = 128) -> Path:
    import gguf

    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", PATCH)
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.projection_dim", text_embd)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    w.add_bool("clip.use_gelu", False)
    w.add_tensor("v.class_embd", r(n_embd))
    w.add_tensor("v.patch_embd.weight", r(n_embd, 3, PATCH, PATCH).astype(np.float16))
    w.add_tensor("v.position_embd.weight", r(IMAGE_TOKENS + 1, n_embd))
    w.add_tensor("v.pre_ln.weight", np.ones(n_embd, np.float32))
    w.add_tensor("v.pre_ln.bias", np.zeros(n_embd, np.float32))
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"v.blk.{i}.{t}.weight", r(n_embd, n_embd).astype(np.float16))
            w.add_tensor(f"v.blk.{i}.{t}.bias", r(n_embd))
        for t in ("ln1", "ln2"):
            w.add_tensor(f"v.blk.{i}.{t}.weight", np.ones(n_embd, np.float32))
            w.add_tensor(f"v.blk.{i}.{t}.bias", np.zeros(n_embd, np.float32))
        w.add_tensor(f"v.blk.{i}.ffn_up.weight", r(n_ff, n_embd).astype(np.float16))
        w.add_tensor(f"v.blk.{i}.ffn_up.bias", r(n_ff))
        w.add_tensor(f"v.blk.{i}.ffn_down.weight", r(n_embd, n_ff).astype(np.float16))
        w.add_tensor(f"v.blk.{i}.ffn_down.bias", r(n_embd))
    w.add_tensor("mm.0.weight", r(hidden, n_embd).astype(np.float16))
    w.add_tensor("mm.0.bias", r(hidden))
    w.add_tensor("mm.2.weight", r(text_embd, hidden).astype(np.float16))
    w.add_tensor("mm.2.bias", r(text_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def projector(tmp_path_factory):
    return write_random_llava_projector(tmp_path_factory.mktemp("vision") / "mmproj-random.gguf")


def test_image_tokens_enter_the_context(gemma_q4, projector, tmp_path):
    from orion_cli.engine import LoadSpec, Timings, load

    image = tiny_png(tmp_path / "red.png")
    model = load(LoadSpec(gemma_q4, 1024, 2, projector=projector))
    try:
        assert model.is_vision
        one, two = Timings(), Timings()
        a = "".join(model.generate("What is in the picture?", images=[image], max_tokens=6, temperature=0.0,
                                   timings=one))
        b = "".join(model.generate("What is in the picture?", images=[image, image], max_tokens=6,
                                   temperature=0.0, timings=two))
    finally:
        model.close()
    assert a and b  # generation returns (random weights: the words mean nothing)
    # the same text with a second image: exactly one more image's worth of tokens in the context
    assert two.prompt_tokens - one.prompt_tokens == IMAGE_TOKENS


def test_run_with_image_end_to_end(orion, gemma_q4, projector, tmp_path):
    proc = orion("import", str(gemma_q4), "--name", "tiny-llava", "--projector", str(projector), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["kind"] == "vision"
    image = tiny_png(tmp_path / "red.png")
    proc = orion("run", "tiny-llava", "Describe the image.", "--image", str(image), "--max-tokens", "5",
                 "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["text"] and data["timings"]["generated_tokens"] >= 1
    listed = json.loads(orion("list", "--json").stdout)["models"][0]
    assert listed["estimate_bytes"] > 0 and listed["projector_path"] == str(projector)


def test_projector_that_does_not_match_the_model(orion, gemma_q4, tmp_path):
    wrong = write_random_llava_projector(tmp_path / "mmproj-wrong.gguf", text_embd=512)
    assert orion("import", str(gemma_q4), "--name", "mismatch", "--projector", str(wrong)).returncode == 0
    proc = orion("run", "mismatch", "x", "--image", str(tiny_png(tmp_path / "x.png")))
    assert_clean_error(proc, "does not fit", code=7)
