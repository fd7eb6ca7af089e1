"""A tiny random-weight llama-architecture GGUF, written on the spot with the gguf package.

It is no language model: its weights are random. It exists for the engine
canary (``engine.check_engine``), which must exercise llama.cpp's quantized
matmul kernels, weight repacking included, without downloading anything.
"""

from __future__ import annotations

from pathlib import Path


def write_tiny_llama(path: Path, *, n_embd: int = 256, n_ff: int = 512, n_layers: int = 2, n_head: int = 4,
                     n_head_kv: int | None = None, n_vocab: int = 0, context_length: int = 512,
                     weight_type: str = "Q4_0", seed: int = 0) -> Path:
    """Write a llama GGUF with a byte-level SentencePiece vocabulary (padded with made-up pieces up
    to ``n_vocab``) and random ``weight_type`` matrices (Q4_0 or F16); returns ``path``.

    The canary uses the defaults; benchmarks write realistic shapes (a 1B llama: n_embd 2048,
    n_ff 8192, 16 layers, 32 heads, 8 KV heads, 128,256 tokens) to quantize with llama.cpp."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁the", "▁a", "e", "t"]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0]
    types = [2, 3, 3] + [6] * 256 + [1] * 5  # unknown, control, control, byte..., normal
    extra = max(0, n_vocab - len(tokens))
    tokens += [f"▁w{i}" for i in range(extra)]
    scores += [-6.0 - i * 1e-6 for i in range(extra)]
    types += [1] * extra
    n_vocab = len(tokens)
    n_head_kv = n_head_kv or n_head
    head_dim = n_embd // n_head
    qtype = getattr(gguf.GGMLQuantizationType, weight_type)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("orion canary (random weights)")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if weight_type == "Q4_0" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def f32(*shape: int):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def add_q4(name: str, rows: int, cols: int) -> None:
        if weight_type == "F16":
            w.add_tensor(name, f32(rows, cols).astype(np.float16))
        else:
            w.add_tensor(name, quantize(f32(rows, cols), qtype), raw_dtype=qtype)

    embd = f32(n_vocab, n_embd)
    w.add_tensor("token_embd.weight", embd if weight_type == "Q4_0" else embd.astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    add_q4("output.weight", n_vocab, n_embd)
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add_q4(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        add_q4(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        add_q4(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        add_q4(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        add_q4(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        add_q4(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        add_q4(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
