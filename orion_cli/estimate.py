"""How much memory a model takes once loaded, from its GGUF header alone.

The estimate is the growth of the process's resident memory (RSS) when
llama.cpp loads the model on the CPU and processes a prompt that fills the
context: weights + repacked weights + KV cache + touched compute buffers +
runtime overhead (+ the projector of a vision model).

Calibration (``docs/benchmarks.md``, ``tests/test_estimate_rss.py``): on
gemma3-270m Q4_K_M the KV cache and weight sizes match llama.cpp's own
buffer report exactly, and the whole estimate is within ±10 % of measured
peak RSS growth at n_ctx 512, 2048 and 8192. llama.cpp's dry run (``no_alloc``)
reports a 515 MiB compute buffer for that model, but only the parts a prompt
touches become resident: the KQ score matrices and the activations of one
micro-batch, which is what the compute part below counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_header import GGUFHeader, ggml_type_name
from .units import format_bytes

MiB = 1024**2

# Encoders: no KV cache, and no output layer tied to the token embedding.
ENCODER_ARCHITECTURES = ("bert", "nomic-bert", "jina-bert-v2")

# Layers that attend to a sliding window, by architecture, as llama.cpp sets
# them (hparams.set_swa_pattern(n)): layer i is SWA when i % n < n - 1.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2, "exaone4": 4}

# ggml-cpu repacks these weight types into interleaved copies for faster matmuls
# (its "extra buffer types"), on x86 with AVX2 and on ARM with NEON.
REPACKED_TYPES = {"Q4_0", "Q4_K", "IQ4_NL"}

# With AMX (an Intel Xeon, and llama.cpp built with AMX_INT8), ggml's AMX buffer type comes
# first: it copies the matrices of these types into tile layout, each block of `n` values taking
# `bytes` there (ggml-cpu/amx/mmq.cpp, get_row_size: Q8_0 adds an int32 compensation per block,
# Q4_K/Q5_K 4 bytes, IQ4_XS 2), when the input width is a multiple of `align` and the output
# width of 32 (amx.cpp, supports_op). The mapped file stays resident beside the copy:
# measured on gemma3-270m, peak RSS growth matches weights + this copy within 1 %.
AMX_LAYOUT = {  # type: (n, bytes, align)
    "Q4_0": (32, 18, 32), "Q4_1": (32, 20, 32), "Q8_0": (32, 34 + 4, 32),
    "Q4_K": (256, 144 + 4, 256), "Q5_K": (256, 176 + 4, 256), "Q6_K": (256, 210, 256),
    "IQ4_XS": (256, 136 + 2, 256), "F16": (1, 2, 16),
}

# Runtime overhead beyond the buffers above: llama.cpp's vocabulary tables and
# context bookkeeping, llama-cpp-python's per-vocabulary arrays, thread pools.
# Two calibration points, measured as peak RSS growth minus the parts above:
# gemma3-270m (262,144-token vocabulary) 48.5 MiB, all-MiniLM-L6-v2 (30,522) 40.4 MiB.
OVERHEAD_BASE_BYTES = int(39.3 * MiB)
OVERHEAD_PER_VOCAB_TOKEN_BYTES = 37


@dataclass(frozen=True)
class EngineSettings:
    """The llama.cpp settings an estimate assumes; orion's engine loads with the same."""

    n_ubatch: int = 512
    swa_full: bool = False  # orion turns llama-cpp-python's full-size SWA cache off: same results, less memory
    flash_attn: bool = False
    repack: bool = True  # llama.cpp's extra buffer types (weight repacking)
    amx: bool = False  # ggml's AMX buffer among them (the engine check says whether it is active)
    kv_bytes_per_value: int = 2  # f16 KV cache


@dataclass(frozen=True)
class Estimate:
    n_ctx: int
    weights_bytes: int
    repack_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    projector_bytes: int
    kv_how: str
    compute_how: str
    repack_how: str

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes + self.repack_bytes + self.kv_bytes + self.compute_bytes
            + self.overhead_bytes + self.projector_bytes
        )

    def parts(self) -> list[tuple[str, int, str]]:
        """(part, bytes, how it was computed) for every non-zero part."""
        rows = [
            ("weights", self.weights_bytes, "sum of tensor sizes in the GGUF"),
            ("repacked weights", self.repack_bytes, self.repack_how),
            ("KV cache", self.kv_bytes, self.kv_how),
            ("compute", self.compute_bytes, self.compute_how),
            ("runtime", self.overhead_bytes, "llama.cpp vocabulary tables, context and thread state"),
            ("projector", self.projector_bytes, "vision projector (mmproj) tensors"),
        ]
        return [r for r in rows if r[1] or r[0] in ("weights", "KV cache")]

    def arithmetic(self) -> str:
        terms = " + ".join(f"{format_bytes(b)} {name}" for name, b, _ in self.parts())
        return f"{terms} = {format_bytes(self.total_bytes)}"

    def to_dict(self) -> dict:
        return {
            "n_ctx": self.n_ctx,
            "total_bytes": self.total_bytes,
            "parts": {name: {"bytes": b, "how": how} for name, b, how in self.parts()},
        }


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def swa_layers(header: GGUFHeader) -> list[bool]:
    """For each layer, whether it attends only to a sliding window."""
    n = header.n_layers
    if not header.sliding_window:
        return [False] * n
    explicit = header.arch_key("attention.sliding_window_pattern")
    if isinstance(explicit, list) and len(explicit) == n:
        return [bool(x) for x in explicit]
    pattern = SWA_PATTERNS.get(header.architecture)
    if pattern is None:
        return [False] * n  # unknown layout: count every layer in full (errs on the safe side)
    return [i % pattern < pattern - 1 for i in range(n)]


def _kv(header: GGUFHeader, n_ctx: int, s: EngineSettings) -> tuple[int, str, int]:
    """KV cache bytes, how, and the most KV cells one layer attends to."""
    if header.architecture in ENCODER_ARCHITECTURES:
        return 0, "encoder: no KV cache", n_ctx
    cells_full = _pad(n_ctx)
    window = header.sliding_window
    swa = swa_layers(header)
    cells_swa = cells_full if s.swa_full or not window else min(cells_full, _pad(window + s.n_ubatch))
    per_cell = [kv * (header.head_dim_k + header.head_dim_v) * s.kv_bytes_per_value for kv in header.n_head_kv]
    total = sum(per_cell[i] * (cells_swa if swa[i] else cells_full) for i in range(header.n_layers))
    n_swa = sum(swa)
    n_full = header.n_layers - n_swa
    cell = format_bytes(max(per_cell or [0]))
    how = f"{n_full} layers × {cells_full} cells"
    if n_swa:
        how += f" + {n_swa} sliding-window layers × {cells_swa} cells"
    how += f", {cell} a cell (K+V, f16)"
    return total, how, cells_full if n_full else cells_swa


def _amx_copies(header: GGUFHeader) -> dict[str, int]:
    """Bytes of each matrix ggml's AMX buffer takes a copy of (see AMX_LAYOUT).

    The token embedding is read by row lookups, not matrix products, unless the model
    ties its output layer to it (no ``output.weight``): then the output's copy is it.
    """
    tied = header.architecture not in ENCODER_ARCHITECTURES and not any(
        t.name == "output.weight" for t in header.tensors)
    out = {}
    for t in header.tensors:
        layout = AMX_LAYOUT.get(ggml_type_name(t.ggml_type))
        if layout is None or len(t.shape) != 2 or (t.name == "token_embd.weight" and not tied):
            continue
        n, block_bytes, align = layout
        k, rows = t.shape
        if k % align == 0 and rows % 32 == 0:
            out[t.name] = rows * (k // n) * block_bytes
    return out


def estimate_memory(
    header: GGUFHeader,
    n_ctx: int,
    settings: EngineSettings | None = None,
    *,
    projector: GGUFHeader | None = None,
    repack_supported: bool = True,
) -> Estimate:
    """Resident memory of the model loaded with ``n_ctx`` and a full context, by part."""
    s = settings or EngineSettings()
    kv_bytes, kv_how, max_cells = _kv(header, n_ctx, s)

    repack = 0
    repack_how = f"{', '.join(sorted(REPACKED_TYPES))} matrices copied into interleaved layout"
    if s.repack and repack_supported:
        amx = _amx_copies(header) if s.amx else {}
        repack = sum(amx.values()) + sum(
            t.n_bytes for t in header.tensors
            if len(t.shape) >= 2 and t.name != "token_embd.weight" and t.name not in amx
            and ggml_type_name(t.ggml_type) in REPACKED_TYPES
        )
        if amx:
            types = sorted({ggml_type_name(t.ggml_type) for t in header.tensors if t.name in amx})
            repack_how = f"{', '.join(types)} matrices copied into AMX tile layout"

    n_ubatch = min(s.n_ubatch, n_ctx)
    heads = max(header.n_head or [1])
    n_ff = header.arch_key("feed_forward_length", 4 * header.n_embd)
    n_ff = max(n_ff) if isinstance(n_ff, list) else int(n_ff or 0)
    kv_heads = max(header.n_head_kv or [heads])
    activations = n_ubatch * 4 * (header.n_embd + 2 * n_ff + (heads + 2 * kv_heads) * header.head_dim_k)
    scores = 0 if s.flash_attn else 2 * n_ubatch * heads * 4 * max_cells
    compute_how = f"activations of {n_ubatch} tokens"
    if scores:
        compute_how += f" + attention scores {n_ubatch} × {max_cells} × {heads} heads (f32, ×2)"

    overhead = OVERHEAD_BASE_BYTES + OVERHEAD_PER_VOCAB_TOKEN_BYTES * header.n_vocab
    return Estimate(
        n_ctx=n_ctx,
        weights_bytes=header.tensor_bytes,
        repack_bytes=repack,
        kv_bytes=kv_bytes,
        compute_bytes=activations + scores,
        overhead_bytes=overhead,
        projector_bytes=projector.tensor_bytes if projector is not None else 0,
        kv_how=kv_how,
        compute_how=compute_how,
        repack_how=repack_how,
    )
