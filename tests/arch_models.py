"""Random-weight GGUFs of the architectures llama.cpp runs, written with the ``gguf`` package.

Their memory behaves like the real models' (same tensors, shapes, KV layout and graphs); their text
is noise, so nothing here judges quality. For the estimate's error table (``bench/estimate.py``,
``tests/test_estimate_matrix.py``) and anything else that needs a model of a shape orion was not
written around.

``write_model(path, arch, **shape)`` writes one; ``SHAPES`` names the shapes the table uses.
"""

from __future__ import annotations

from pathlib import Path

# Each shape: the architecture and its hyperparameters. "small" shapes run in make test on 2 cores;
# "bench" shapes are ~0.1-0.5B, the size a user's first local model has.
SMALL = {
    "llama": dict(arch="llama", n_embd=512, n_ff=1408, n_layers=6, n_head=8, n_head_kv=2, n_vocab=16000),
    "qwen2": dict(arch="qwen2", n_embd=448, n_ff=1216, n_layers=6, n_head=7, n_head_kv=1, n_vocab=24000),
    "qwen3": dict(arch="qwen3", n_embd=512, n_ff=1536, n_layers=6, n_head=8, n_head_kv=4, head_dim=128,
                  n_vocab=20000),
    "gemma3": dict(arch="gemma3", n_embd=384, n_ff=1536, n_layers=7, n_head=4, n_head_kv=1, head_dim=128,
                   n_vocab=32000, sliding_window=256),
    "gemma2": dict(arch="gemma2", n_embd=384, n_ff=1024, n_layers=6, n_head=6, n_head_kv=2, head_dim=64,
                   n_vocab=16000, sliding_window=512),
    "phi3": dict(arch="phi3", n_embd=512, n_ff=1376, n_layers=6, n_head=8, n_head_kv=8, n_vocab=12000),
    "llama-yarn": dict(arch="llama", n_embd=384, n_ff=1024, n_layers=6, n_head=6, n_head_kv=2, n_vocab=16000,
                       yarn=4.0),
    "qwen3moe": dict(arch="qwen3moe", n_embd=384, n_ff=256, n_layers=4, n_head=6, n_head_kv=2, head_dim=64,
                     n_vocab=16000, n_expert=8, n_expert_used=2),
    "bert": dict(arch="bert", n_embd=512, n_ff=2048, n_layers=6, n_head=8, n_vocab=30522),
}
BENCH = {
    "llama": dict(arch="llama", n_embd=896, n_ff=4864, n_layers=24, n_head=14, n_head_kv=2, n_vocab=32000),
    "qwen2": dict(arch="qwen2", n_embd=896, n_ff=4864, n_layers=24, n_head=14, n_head_kv=2, n_vocab=151936),
    "qwen3": dict(arch="qwen3", n_embd=1024, n_ff=3072, n_layers=12, n_head=16, n_head_kv=8, head_dim=128,
                  n_vocab=151936),
    "gemma3": dict(arch="gemma3", n_embd=640, n_ff=2048, n_layers=18, n_head=4, n_head_kv=1, head_dim=256,
                   n_vocab=262144, sliding_window=512),
    "gemma2": dict(arch="gemma2", n_embd=768, n_ff=3072, n_layers=12, n_head=8, n_head_kv=4, head_dim=128,
                   n_vocab=65536, sliding_window=1024),
    "phi3": dict(arch="phi3", n_embd=1024, n_ff=2816, n_layers=12, n_head=16, n_head_kv=16, n_vocab=32064),
    "llama-yarn": dict(arch="llama", n_embd=1024, n_ff=2816, n_layers=12, n_head=16, n_head_kv=4,
                       n_vocab=64000, yarn=4.0),
    "qwen3moe": dict(arch="qwen3moe", n_embd=768, n_ff=384, n_layers=8, n_head=12, n_head_kv=4, head_dim=64,
                     n_vocab=64000, n_expert=32, n_expert_used=4),
    "bert": dict(arch="bert", n_embd=768, n_ff=3072, n_layers=12, n_head=12, n_vocab=30522),
}
# "check" shapes: none of the estimate's constants was set on them. Variants of phi3's 1024 x 12
# (phi3 alone, of the bench shapes, held about 35 MiB more RAM beside a GPU: its fused up/gate or its
# 16 KV heads?), and the widths of real models a user runs (few layers, to keep the files small).
CHECK = {
    "llama-mha": dict(arch="llama", n_embd=1024, n_ff=2816, n_layers=12, n_head=16, n_head_kv=16, n_vocab=32064),
    "llama-ff5632": dict(arch="llama", n_embd=1024, n_ff=5632, n_layers=12, n_head=16, n_head_kv=16,
                         n_vocab=32064),
    "phi3-gqa": dict(arch="phi3", n_embd=1024, n_ff=2816, n_layers=12, n_head=16, n_head_kv=4, n_vocab=32064),
    "qwen2-1536": dict(arch="qwen2", n_embd=1536, n_ff=8960, n_layers=8, n_head=12, n_head_kv=2, n_vocab=151936),
    "llama-3072": dict(arch="llama", n_embd=3072, n_ff=8192, n_layers=4, n_head=24, n_head_kv=8, n_vocab=128256),
    "gemma2-2304": dict(arch="gemma2", n_embd=2304, n_ff=9216, n_layers=6, n_head=8, n_head_kv=4, head_dim=256,
                        n_vocab=256000, sliding_window=4096),
    "llama-4096": dict(arch="llama", n_embd=4096, n_ff=14336, n_layers=2, n_head=32, n_head_kv=8, n_vocab=32768),
}
# "widths": held out from the CUDA runtime's steps by the largest float matrix dimension (5,120 and 8,192):
# real widths between and around them (TinyLlama's 2,048 x 5,632, Qwen3-1.7B's 2,048 x 6,144, a 6,912,
# Qwen2.5-3B's 2,048 x 11,008), few layers.
WIDTHS = {
    "llama-2048": dict(arch="llama", n_embd=2048, n_ff=5632, n_layers=4, n_head=32, n_head_kv=4, n_vocab=32000),
    "qwen3-2048": dict(arch="qwen3", n_embd=2048, n_ff=6144, n_layers=4, n_head=16, n_head_kv=8, head_dim=128,
                       n_vocab=151936),
    "llama-ff6912": dict(arch="llama", n_embd=1536, n_ff=6912, n_layers=6, n_head=12, n_head_kv=4, n_vocab=32000),
    "qwen2-2048": dict(arch="qwen2", n_embd=2048, n_ff=11008, n_layers=3, n_head=16, n_head_kv=2, n_vocab=151936),
}
SHAPES = {"small": SMALL, "bench": BENCH, "check": CHECK, "widths": WIDTHS}


def write_model(path: Path, arch: str, *, n_embd: int, n_ff: int, n_layers: int, n_head: int,
                n_head_kv: int | None = None, head_dim: int | None = None, n_vocab: int = 16000,
                sliding_window: int | None = None, yarn: float | None = None, n_expert: int = 0,
                n_expert_used: int = 0, context_length: int = 32768, weight_type: str = "F16",
                seed: int = 0, chat_template: str | None = None) -> Path:
    """Write a random-weight GGUF of ``arch`` (F16 matrices, or Q8_0/Q4_0; ``chat_template``: a
    ``tokenizer.chat_template`` to carry); returns ``path``."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    n_head_kv = n_head_kv or n_head
    head_dim = head_dim or n_embd // n_head
    bert = arch == "bert"
    qtype = getattr(gguf.GGMLQuantizationType, weight_type)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"random {arch} {n_embd}x{n_layers} (not a language model)")
    w.add_context_length(512 if bert else context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[weight_type])
    if bert:
        w.add_layer_norm_eps(1e-12)
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.MEAN)
        _bert_vocab(w, n_vocab)
    else:
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)
        if head_dim != n_embd // n_head or arch in ("gemma2", "gemma3", "qwen3", "qwen3moe"):
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if sliding_window:
            w.add_sliding_window(sliding_window)
        if yarn:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(yarn)
            w.add_rope_scaling_orig_ctx_len(context_length // int(yarn))
        if n_expert:
            w.add_expert_count(n_expert)
            w.add_expert_used_count(n_expert_used)
            w.add_expert_feed_forward_length(n_ff)
        _spm_vocab(w, n_vocab)
        if chat_template:
            w.add_chat_template(chat_template)

    def rand(*shape: int):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def matrix(name: str, *shape: int) -> None:  # numpy order: (..., rows, cols)
        if weight_type == "F16":
            w.add_tensor(name, rand(*shape).astype(np.float16))
        else:
            w.add_tensor(name, quantize(rand(*shape), qtype), raw_dtype=qtype)

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    def zeros(name: str, n: int) -> None:
        w.add_tensor(name, np.zeros(n, dtype=np.float32))

    q, kv = n_head * head_dim, n_head_kv * head_dim
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd).astype(np.float16))
    if bert:
        w.add_tensor("token_types.weight", rand(2, n_embd))
        w.add_tensor("position_embd.weight", rand(512, n_embd).astype(np.float16))
        ones("token_embd_norm.weight", n_embd)
        zeros("token_embd_norm.bias", n_embd)
        for i in range(n_layers):
            p = f"blk.{i}."
            for part, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv), ("attn_output", n_embd)):
                matrix(p + part + ".weight", rows, n_embd)
                zeros(p + part + ".bias", rows)
            ones(p + "attn_output_norm.weight", n_embd)
            zeros(p + "attn_output_norm.bias", n_embd)
            matrix(p + "ffn_up.weight", n_ff, n_embd)
            zeros(p + "ffn_up.bias", n_ff)
            matrix(p + "ffn_down.weight", n_embd, n_ff)
            zeros(p + "ffn_down.bias", n_embd)
            ones(p + "layer_output_norm.weight", n_embd)
            zeros(p + "layer_output_norm.bias", n_embd)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    ones("output_norm.weight", n_embd)
    if arch not in ("gemma2", "gemma3"):  # gemmas tie the output to the token embedding
        matrix("output.weight", n_vocab, n_embd)
    for i in range(n_layers):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", n_embd)
        matrix(p + "attn_q.weight", q, n_embd)
        matrix(p + "attn_k.weight", kv, n_embd)
        matrix(p + "attn_v.weight", kv, n_embd)
        matrix(p + "attn_output.weight", n_embd, q)
        if arch == "qwen2":
            zeros(p + "attn_q.bias", q)
            zeros(p + "attn_k.bias", kv)
            zeros(p + "attn_v.bias", kv)
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            ones(p + "attn_q_norm.weight", head_dim)
            ones(p + "attn_k_norm.weight", head_dim)
        if arch in ("gemma2", "gemma3"):
            ones(p + "post_attention_norm.weight", n_embd)
            ones(p + "post_ffw_norm.weight", n_embd)
        ones(p + "ffn_norm.weight", n_embd)
        if n_expert:
            w.add_tensor(p + "ffn_gate_inp.weight", rand(n_expert, n_embd))
            matrix(p + "ffn_gate_exps.weight", n_expert, n_ff, n_embd)
            matrix(p + "ffn_up_exps.weight", n_expert, n_ff, n_embd)
            matrix(p + "ffn_down_exps.weight", n_expert, n_embd, n_ff)
        elif arch == "phi3":
            matrix(p + "ffn_up.weight", 2 * n_ff, n_embd)
            matrix(p + "ffn_down.weight", n_embd, n_ff)
        else:
            matrix(p + "ffn_gate.weight", n_ff, n_embd)
            matrix(p + "ffn_up.weight", n_ff, n_embd)
            matrix(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _spm_vocab(w, n_vocab: int) -> None:
    """A byte-level SentencePiece vocabulary padded with made-up pieces up to ``n_vocab``."""
    # llama.cpp looks "<|endoftext|>" up in any vocabulary of a model named phi3
    tokens = ["<unk>", "<s>", "</s>", "<|endoftext|>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁w{i}" for i in range(n_vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 260 + [-1.0 - i * 1e-6 for i in range(len(tokens) - 260)])
    w.add_token_types([2, 3, 3, 3] + [6] * 256 + [1] * (len(tokens) - 260))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def _bert_vocab(w, n_vocab: int) -> None:
    """A WordPiece vocabulary: BERT's specials, letters, and made-up words up to ``n_vocab``."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [f"w{i}" for i in range(n_vocab - len(tokens))]
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 5 + [1] * (len(tokens) - 5))
    w.add_unk_token_id(1)
    w.add_bos_token_id(2)  # [CLS]
    w.add_eos_token_id(3)  # [SEP]
    w.add_sep_token_id(3)
    w.add_pad_token_id(0)
    w.add_mask_token_id(4)
