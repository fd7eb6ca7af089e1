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

from .cuda_runtime import CUDA_CONTEXT_BYTES, cuda_context_bytes, cuda_host_bytes
from .gguf_header import GGUFHeader, ggml_type_name
from .tensor_layers import ENCODER_ARCHITECTURES, tensor_layer
from .units import format_bytes

MiB = 1024**2


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

# Runtime memory beyond llama.cpp's buffers: its vocabulary tables and context bookkeeping, the
# thread pool, llama-cpp-python's arrays. Fitted over the random-weight architectures of
# tests/arch_models.py (9 architectures, 12,000 to 32,000 tokens, n_ctx 512 to 8,192: within 1 MiB of
# each, measured as resident growth with the context filled minus every buffer llama.cpp reports),
# and checked on gemma3-270m (262,144 tokens); flash attention's kernels add a little, growing with
# the context.
RUNTIME_BASE_BYTES = int(4.2 * MiB)
RUNTIME_PER_VOCAB_TOKEN_BYTES = 195
FLASH_RUNTIME_BYTES = int(1.5 * MiB)
FLASH_RUNTIME_PER_CELL_BYTES = 290


# KV cache types orion offers: (values a block, bytes a block), as ggml stores them.
KV_TYPES = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}
# their ggml type ids (ggml.h: GGML_TYPE_F16 = 1, Q4_0 = 2, Q8_0 = 8), as llama.cpp's type_k/type_v take them
KV_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2}


def kv_row_bytes(kv_type: str, n_values: int) -> int:
    """Bytes of one KV cell's row of ``n_values`` in ``kv_type`` (ggml_row_size)."""
    block, size = KV_TYPES[kv_type]
    return n_values // block * size


@dataclass(frozen=True)
class EngineSettings:
    """The llama.cpp settings an estimate assumes; orion's engine loads with the same."""

    n_ubatch: int = 512
    swa_full: bool = False  # orion turns llama-cpp-python's full-size SWA cache off: same results, less memory
    flash_attn: bool = False
    repack: bool = True  # llama.cpp's extra buffer types (weight repacking)
    amx: bool = False  # ggml's AMX buffer among them (the engine check says whether it is active)
    type_k: str = "f16"  # the KV cache's K type: f16, q8_0 or q4_0 (KV_TYPES)
    type_v: str = "f16"  # its V type (quantized only with flash attention: llama.cpp's rule)
    embed_pack: int = 1  # sequences an encoder decodes together (one llama_decode; its window × this)

    def encoder_tokens(self, n_ctx: int) -> int:
        """Tokens an encoder's decode holds at most (its batch and context size): ``embed_pack`` windows."""
        return n_ctx * self.embed_pack


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
    source: str = "formula"  # where the compute and output figures come from: "formula" or "llama.cpp dry run"
    compute_at_load_bytes: int = 0  # of compute_bytes, what is resident once loaded (pinned host buffers, outputs)

    @property
    def fill_bytes(self) -> int:
        """The part a decode makes resident (compute buffers), not there right after the load."""
        return self.compute_bytes - self.compute_at_load_bytes

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
            "source": self.source,
            "parts": {name: {"bytes": b, "how": how} for name, b, how in self.parts()},
        }


def first_gpu_layer(n_layers: int, n_gpu_layers: int) -> int:
    """The first layer llama.cpp offloads for ``n_gpu_layers`` (it counts from the output down:
    ``n_gpu_layers`` = n_layers + 1 puts every repeating layer and the output on the GPU)."""
    if n_gpu_layers < 0:
        return 0
    return max(n_layers + 1 - n_gpu_layers, 0)


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


def kv_per_layer(header: GGUFHeader, n_ctx: int, s: EngineSettings) -> list[int]:
    """KV cache bytes of each layer (none for an encoder)."""
    if header.architecture in ENCODER_ARCHITECTURES:
        return [0] * header.n_layers
    cells_full = _pad(n_ctx)
    window = header.sliding_window
    swa = swa_layers(header)
    cells_swa = cells_full if s.swa_full or not window else min(cells_full, _pad(window + s.n_ubatch))
    per_cell = _kv_cell_bytes(header, s)
    return [per_cell[i] * (cells_swa if swa[i] else cells_full) for i in range(header.n_layers)]


def _kv_cell_bytes(header: GGUFHeader, s: EngineSettings) -> list[int]:
    """Bytes of one KV cell of each layer: K and V rows in their types."""
    return [kv_row_bytes(s.type_k, kv * header.head_dim_k) + kv_row_bytes(s.type_v, kv * header.head_dim_v)
            for kv in header.n_head_kv]


def _kv(header: GGUFHeader, n_ctx: int, s: EngineSettings, first_gpu: int | None = None) -> tuple[int, str, int]:
    """KV cache bytes (of the layers below ``first_gpu``: those on the CPU), how, and the most KV
    cells one layer attends to."""
    if header.architecture in ENCODER_ARCHITECTURES:
        return 0, "encoder: no KV cache", s.encoder_tokens(n_ctx)
    cells_full = _pad(n_ctx)
    window = header.sliding_window
    swa = swa_layers(header)
    cells_swa = cells_full if s.swa_full or not window else min(cells_full, _pad(window + s.n_ubatch))
    per_cell = _kv_cell_bytes(header, s)
    per_layer = kv_per_layer(header, n_ctx, s)
    total = sum(per_layer[: header.n_layers if first_gpu is None else first_gpu])
    n_swa = sum(swa)
    n_full = header.n_layers - n_swa
    cell = format_bytes(max(per_cell or [0]))
    how = f"{n_full} layers × {cells_full} cells"
    if n_swa:
        how += f" + {n_swa} sliding-window layers × {cells_swa} cells"
    kinds = s.type_k if s.type_k == s.type_v else f"K {s.type_k}, V {s.type_v}"
    how += f", {cell} a cell (K+V, {kinds})"
    if first_gpu is not None and first_gpu < header.n_layers:
        how = f"the {first_gpu} layers on the CPU of {how}"
    return total, how, cells_full if n_full else cells_swa


def _amx_copies(header: GGUFHeader) -> dict[str, int]:
    """Bytes of each matrix ggml's AMX buffer takes a copy of (see AMX_LAYOUT).

    The token embedding is read by row lookups, not matrix products, unless the model
    ties its output layer to it (no ``output.weight``): then the output's copy is it.
    """
    tied = _tied_output(header)
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


def _tied_output(header: GGUFHeader) -> bool:
    return header.architecture not in ENCODER_ARCHITECTURES and not any(
        t.name == "output.weight" for t in header.tensors)


def estimate_memory(
    header: GGUFHeader,
    n_ctx: int,
    settings: EngineSettings | None = None,
    *,
    projector: GGUFHeader | None = None,
    repack_supported: bool = True,
    n_gpu_layers: int = 0,
    remote: bool = False,
    parallel: int = 1,
    dry=None,
) -> Estimate:
    """Resident memory (RAM) of the model loaded with ``n_ctx`` and a full context, by part.

    ``dry``: llama.cpp's dry run of the same load (:class:`orion_cli.engine.DryRun`): its compute and
    output buffers replace the formula's (which remains for what-ifs: other machines, budgets, contexts).

    With ``n_gpu_layers`` > 0, the part that stays on the CPU: the input layer, the layers below
    the first offloaded one, their KV cache, and the runtime (CUDA's host side included);
    :func:`estimate_gpu` counts the rest. ``remote``: the offloaded layers go to RPC servers (other
    machines): no CUDA runtime here, and their weights are not counted here either — llama.cpp reads
    them from the mapped file once, sends them and unmaps them (file pages the kernel drops, not
    memory this machine must keep)."""
    s = settings or EngineSettings()
    first_gpu = first_gpu_layer(header.n_layers, n_gpu_layers) if n_gpu_layers else header.n_layers + 1
    offloaded = first_gpu <= header.n_layers
    kv_bytes, kv_how, max_cells = _kv(header, n_ctx, s, first_gpu if offloaded else None)

    def on_cpu(name: str) -> bool:
        layer = tensor_layer(name, header.n_layers)
        return layer is None or layer < first_gpu

    repack = 0
    repack_how = f"{', '.join(sorted(REPACKED_TYPES))} matrices copied into interleaved layout"
    if s.repack and repack_supported:
        # a tied output's copy is the token embedding's: on the CPU only while the output is
        amx = {k: v for k, v in _amx_copies(header).items()
               if (k != "token_embd.weight" and on_cpu(k)) or first_gpu > header.n_layers} if s.amx else {}
        repack = sum(amx.values()) + sum(
            t.n_bytes for t in header.tensors
            if len(t.shape) >= 2 and t.name != "token_embd.weight" and t.name not in amx and on_cpu(t.name)
            and ggml_type_name(t.ggml_type) in REPACKED_TYPES
        )
        if amx:
            types = sorted({ggml_type_name(t.ggml_type) for t in header.tensors if t.name in amx})
            repack_how = f"{', '.join(types)} matrices copied into AMX tile layout"

    compute, compute_how, at_load = _cpu_compute(header, n_ctx, s, max_cells, parallel, offloaded=first_gpu == 0,
                                                 dry=dry)
    overhead = RUNTIME_BASE_BYTES + RUNTIME_PER_VOCAB_TOKEN_BYTES * header.n_vocab
    if s.flash_attn:
        overhead += FLASH_RUNTIME_BYTES + FLASH_RUNTIME_PER_CELL_BYTES * n_ctx
    if offloaded and not remote:
        overhead += cuda_host_bytes(header, n_ctx, s, first_gpu)
    # The weights that stay on the CPU. Loading maps the whole file and reads every tensor, the
    # offloaded ones on their way to the GPU, then llama.cpp unmaps the ranges no CPU buffer uses:
    # those are clean file pages during the load, not memory the model holds.
    weights = sum(t.n_bytes for t in header.tensors if on_cpu(t.name))
    return Estimate(
        n_ctx=n_ctx,
        weights_bytes=weights,
        repack_bytes=repack,
        kv_bytes=kv_bytes,
        compute_bytes=compute,
        overhead_bytes=overhead,
        projector_bytes=projector.tensor_bytes if projector is not None and not offloaded else 0,
        kv_how=kv_how,
        compute_how=compute_how,
        repack_how=repack_how,
        source="formula" if dry is None else "llama.cpp dry run",
        compute_at_load_bytes=at_load,
    )


def _cpu_compute(header: GGUFHeader, n_ctx: int, s: EngineSettings, cells: int, parallel: int, *,
                 offloaded: bool, dry=None) -> tuple[int, str, int]:
    """What the CPU's compute side holds once a full context was decoded: llama.cpp's compute buffer
    (allocated for the worst micro-batch and all touched by one at a full context), ggml-cpu's work
    buffer (without flash attention: the softmaxed scores converted to f16 for the product with V,
    which no dry run reports) and the output buffer (an encoder's holds every token of a window: its
    logits and embeddings, as llama.cpp sizes it). The third value is the part resident as soon as the
    model is loaded: the output buffer llama.cpp clears at the start, and CUDA's pinned host buffers."""
    encoder = header.architecture in ENCODER_ARCHITECTURES
    heads = max(header.n_head or [1])
    tokens = s.encoder_tokens(n_ctx) if encoder else min(s.n_ubatch, n_ctx)
    if encoder:
        cells = tokens
    work = 0 if s.flash_attn or offloaded else 2 * heads * tokens * cells
    if encoder:
        output = (header.n_vocab + header.n_embd) * 4 * tokens
        at_load = (header.n_vocab + header.n_embd) * 4 * min(tokens, 256)  # llama-cpp-python's n_seq_max
    else:
        output = at_load = header.n_vocab * 4 * max(1, parallel)
    if dry is not None:
        buffer = sum(v for k, v in dry.compute.items() if _host_buffer(k))
        reserved = sum(v for k, v in dry.output.items() if _host_buffer(k))
        at_load = reserved or at_load
        if not encoder:
            output = reserved or output
        at_load += sum(v for k, v in dry.compute.items() if k.endswith("_Host"))
        how = "llama.cpp's dry run: compute buffer"
    elif offloaded:  # everything on the GPU: the CPU only looks up the input embeddings
        buffer = tokens * 4 * header.n_embd
        how = f"input embeddings of {tokens} tokens (the rest runs on the GPU)"
    else:
        n_ff = _n_ff(header)
        kv_heads = max(header.n_head_kv or [heads])
        buffer = tokens * 4 * (header.n_embd + 2 * n_ff + (heads + 2 * kv_heads) * header.head_dim_k)
        buffer += 2 * tokens * cells if s.flash_attn else 4 * (heads + 1) * tokens * cells
        how = f"activations of {tokens} tokens"
        if not s.flash_attn:
            how += f" + attention scores {tokens} × {cells} × {heads} heads"
    if work:
        how += " + scores in f16 (work buffer)"
    how += " + outputs"
    return buffer + work + output, how, min(at_load, buffer + work + output)


def _host_buffer(name: str) -> bool:
    """Whether one of llama.cpp's buffers is in this machine's RAM (CPU, CUDA's pinned host memory)."""
    return name.startswith("CPU") or name.endswith("_Host")


def _n_ff(header: GGUFHeader) -> int:
    n_ff = header.arch_key("feed_forward_length", 4 * header.n_embd)
    return max(n_ff) if isinstance(n_ff, list) else int(n_ff or 0)


# ---------------------------------------------------------------- on a GPU

def gpu_compute_bytes(header: GGUFHeader, n_ctx: int, settings: EngineSettings, *, with_output: bool,
                      embedding: bool = False, outputs: int = 1) -> int:
    """The compute buffer llama.cpp reserves on a GPU (allocated whole there, unlike the CPU's,
    of which only the touched pages count): the peak of the graph for one micro-batch, which is
    the logits when the output layer is on that GPU (n_ubatch × vocabulary, f32), else the
    feed-forward activations or, without flash attention, the attention scores.

    Fitted to llama.cpp's own report (``compute buffer size``) for gemma3-270m and a random
    1024-wide llama at 512 to 16,384 cells, with and without flash attention."""
    s = settings
    n_ubatch = min(s.n_ubatch, n_ctx) if not embedding else s.encoder_tokens(n_ctx)
    cells = _pad(n_ctx) if header.architecture not in ENCODER_ARCHITECTURES else n_ubatch
    heads = max(header.n_head or [1])
    kv_heads = max(header.n_head_kv or [heads])
    ffn = n_ubatch * 4 * 4 * _n_ff(header)
    if s.flash_attn:
        layer_peak = ffn + cells * n_ubatch * 2  # + the f16 mask
    else:
        attention = cells * n_ubatch * (4 * heads + 4) + n_ubatch * 4 * (
            4 * header.n_embd + 6 * kv_heads * header.head_dim_k)
        layer_peak = max(ffn, attention)
    output_peak = 0
    if with_output and not embedding and header.architecture not in ENCODER_ARCHITECTURES:
        # the logits of one output a sequence (orion's loads ask for no more), the last activations
        output_peak = max(1, outputs) * 4 * header.n_vocab + n_ubatch * 4 * 2 * header.n_embd
    return max(layer_peak, output_peak)


@dataclass(frozen=True)
class GPUEstimate:
    """What one GPU holds for the layers offloaded to it."""

    layers: tuple[int, int]  # [first, last] layer indices on it (n_layers = the output)
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    runtime_bytes: int
    projector_bytes: int = 0
    source: str = "formula"  # where the compute figure comes from: "formula" or "llama.cpp dry run"

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0] + 1 if self.layers[1] >= self.layers[0] else 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.runtime_bytes + self.projector_bytes

    def arithmetic(self) -> str:
        parts = [("weights", self.weights_bytes), ("KV cache", self.kv_bytes), ("compute", self.compute_bytes),
                 ("CUDA runtime", self.runtime_bytes), ("projector", self.projector_bytes)]
        terms = " + ".join(f"{format_bytes(b)} {name}" for name, b in parts if b or name == "weights")
        return f"{terms} = {format_bytes(self.total_bytes)}"

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "total_bytes": self.total_bytes, "weights_bytes": self.weights_bytes,
                "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes, "runtime_bytes": self.runtime_bytes,
                "projector_bytes": self.projector_bytes, "source": self.source}


def estimate_gpu(header: GGUFHeader, n_ctx: int, settings: EngineSettings, first: int, last: int, *,
                 projector: GGUFHeader | None = None, embedding: bool = False,
                 runtime_bytes: int = CUDA_CONTEXT_BYTES) -> GPUEstimate:
    """One GPU's memory for layers ``first``..``last`` (``header.n_layers`` is the output layer).
    ``runtime_bytes``: what the device holds beyond llama.cpp's buffers (a CUDA context; nothing for
    an RPC server's device, whose process set up its backend before it reported its free memory)."""
    n = header.n_layers
    weights = sum(t.n_bytes for t in header.tensors
                  if (layer := tensor_layer(t.name, n)) is not None and first <= layer <= last)
    with_output = first <= n <= last
    if with_output and _tied_output(header):
        weights += sum(t.n_bytes for t in header.tensors if t.name == "token_embd.weight")  # the output's copy
    kv = sum(kv_per_layer(header, n_ctx, settings)[first: min(last, n - 1) + 1])
    if runtime_bytes == CUDA_CONTEXT_BYTES:
        runtime_bytes = cuda_context_bytes(header, first, settings, last)
    return GPUEstimate(
        layers=(first, last),
        weights_bytes=weights,
        kv_bytes=kv,
        compute_bytes=gpu_compute_bytes(header, n_ctx, settings, with_output=with_output, embedding=embedding),
        runtime_bytes=runtime_bytes,
        projector_bytes=projector.tensor_bytes if projector is not None and with_output else 0,
    )
