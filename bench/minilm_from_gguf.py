"""all-MiniLM-L6-v2's float32 safetensors from orion's F16 GGUF of it, for sentence-transformers
on a machine the 64 MiB carry limit reaches with one of the two (bench/gpu_device.sh).

    python bench/minilm_from_gguf.py MODEL.gguf OUT/model.safetensors
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
from safetensors.numpy import save_file


def hf_names(n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> the BERT name sentence-transformers' checkpoint uses."""
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers).mapping
    out: dict[str, str] = {}
    for hf, (_, name) in mapping.items():
        if hf.startswith(("embeddings.", "encoder.")) and name not in out:
            out[name] = hf
    return out


def main() -> None:
    src, dst = sys.argv[1:3]
    reader = gguf.GGUFReader(src)
    n_layers = int(reader.fields["bert.block_count"].parts[-1][0])
    names = hf_names(n_layers)
    tensors = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        tensors[f"{names[base]}.{suffix}"] = np.array(t.data).astype(np.float32)
    save_file(tensors, dst)


if __name__ == "__main__":
    main()
