"""The quantization types and levels: the one home of these facts for every part of orion.

- a *level* (``q4``, ``q8``, ``q16``, ``q32``) is what a tier and ``--quant``/``--to`` speak of;
- a *file type* (``Q4_K_M``...) is llama.cpp's ``llama_ftype``, the ``general.file_type`` of a GGUF;
- the ggml tensor types (``Q4_K``...) with their block sizes live in ``gguf_header.GGML_TYPES``.

Imports nothing: the header reader, the strategy and the CLI read it on every start.
"""

from __future__ import annotations

LEVELS = ("q4", "q8", "q16", "q32")

# The file type each level stands for: the best a tier's level allows ('fetch --auto'), and what
# 'quantize --to LEVEL' makes.
LEVEL_TYPE = {"q4": "Q4_K_M", "q8": "Q8_0", "q16": "F16", "q32": "F32"}
# What 'fetch --quant LEVEL' takes from a repo, the first that exists.
LEVEL_PREFERRED = {"q4": ("Q4_K_M", "Q4_0"), "q8": ("Q8_0",), "q16": ("F16", "BF16"), "q32": ("F32",)}

# llama_ftype (general.file_type) of every file type, as llama.h / gguf.LlamaFileType define them.
FILE_TYPE_IDS: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25,
    "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36,
    "TQ2_0": 37, "MXFP4_MOE": 38, "NVFP4": 39, "Q1_0": 40,
}
FILE_TYPE_NAMES: dict[int, str] = {v: k for k, v in FILE_TYPE_IDS.items()}

# Types llama.cpp refuses to make without an importance matrix (llama-cpp-python cannot pass one).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_XS", "Q2_K_S")
# Types orion's quantizer makes (llama.cpp's, without an importance matrix), best first.
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
               "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_S", "IQ3_M", "Q2_K")

# Quality order of file types, best first; equal numbers are equal quality.
QUALITY = {
    "F32": 0, "BF16": 1, "F16": 1, "Q8_0": 2, "Q6_K": 3, "Q5_K_M": 4, "Q5_K_S": 5, "Q5_1": 6, "Q5_0": 7,
    "Q4_K_M": 8, "Q4_K_S": 9, "IQ4_NL": 10, "IQ4_XS": 11, "Q4_1": 12, "Q4_0": 13, "Q3_K_L": 14,
    "Q3_K_M": 15, "IQ3_M": 16, "IQ3_S": 17, "Q3_K_S": 18, "IQ3_XS": 19, "IQ3_XXS": 20, "Q2_K": 21,
    "Q2_K_S": 22, "IQ2_M": 23, "IQ2_S": 24, "IQ2_XS": 25, "IQ2_XXS": 26, "IQ1_M": 27, "IQ1_S": 28,
}

# Short names people use for a mix: the usual one.
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}

# The ggml tensor type most of a mix's weights take (for sizes).
MAIN_TENSOR_TYPE = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q3_K_L": "Q3_K",
                    "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "IQ3_M": "IQ3_S"}


def quality_rank(file_type: str) -> int:
    """0 for the best (F32); unknown types rank last."""
    return QUALITY.get(file_type.upper(), len(QUALITY))
