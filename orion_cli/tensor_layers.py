"""Which layer a GGUF tensor belongs to, as llama.cpp places it, and which architectures are encoders:
facts of llama.cpp's naming that the estimate, the offload plan and the CUDA runtime's figures share."""

from __future__ import annotations

# Encoders: no KV cache, and no output layer tied to the token embedding.
ENCODER_ARCHITECTURES = ("bert", "nomic-bert", "jina-bert-v2")


def tensor_layer(name: str, n_layers: int) -> int | None:
    """Where llama.cpp places a tensor when it offloads: ``blk.i.*`` with layer i, the output
    (``output.weight``, ``output_norm``) as layer ``n_layers``; None for the input layer
    (token embedding and the like), which llama.cpp always keeps on the CPU."""
    if name.startswith("blk."):
        head = name.split(".", 2)[1]
        return int(head) if head.isdigit() else None
    if name.startswith(("output.", "output_norm")):
        return n_layers
    return None
