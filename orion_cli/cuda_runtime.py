"""What the CUDA runtime holds beyond llama.cpp's buffers, on a GPU and in this machine's RAM, for a
model offloaded to it: measured figures, by which of cuBLAS's kernels the model's matrices need."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .gguf_header import GGUFHeader, ggml_type_name
from .tensor_layers import ENCODER_ARCHITECTURES, tensor_layer

if TYPE_CHECKING:
    from .estimate import EngineSettings

MiB = 1024**2

# What a process that uses a CUDA GPU holds there beyond llama.cpp's buffers (the CUDA context,
# ggml-cuda's memory pool, the kernels loaded) and on the host (the CUDA runtime's libraries, its
# pinned staging buffers, the kernels loaded). CUDA loads a kernel when a batch shape first needs it
# (CUDA_MODULE_LOADING=LAZY, the default), so what a model holds grows with the batch sizes it has met
# and then stays; the figures are after batches of every size (tests/memory_probe.py's sweep), what a
# long-lived model holds. The big difference is cuBLAS: ggml-cuda multiplies a batch by a float matrix
# (F16, BF16, F32) through it, and by a quantized one with its own kernels. Measured on an H200 with
# bench/estimate.py (docs/benchmarks.md), NVML's growth and resident growth beyond the weights, the KV
# cache and llama.cpp's dry-run buffers, for 9 architectures fully offloaded at 4,096 to 65,536 cells:
# - on the GPU, 697 to 713 MiB with cuBLAS (F16 matrices; an encoder's, whatever its matrices), 607 to 615 without;
CUDA_CONTEXT_BYTES = 704 * MiB
CUBLAS_DEVICE_BYTES = 96 * MiB
# - on the host, an LLM with float (F16) matrices: cuBLAS's half-precision kernels, and which of them
#   load grows with the matrices' largest dimension (n_ff, as a rule): 335 MiB up to 4,864 (8 bench
#   shapes: 311 to 356 measured at 4,096 to 65,536 cells), 373 at 5,632 (phi3's fused up/gate, and a
#   llama with n_ff 5,632: 366 to 379), 408 from 8,192 (widths 1,536 to 4,096, n_ff 8,192 to 14,336:
#   403 to 412). The step between 5,632 and 8,192 is not measured: it is taken at 8,192;
CUDA_HOST_BYTES = 335 * MiB
CUDA_HOST_GEMM_STEPS = ((5120, 38 * MiB), (8192, 73 * MiB))
# - 308 MiB with cuBLAS's single-precision kernels alone (a quantized mixture of experts: its router
#   stays F32), 164 without cuBLAS (Q8_0 and Q4_0 matrices: 157 to 172 measured), 18 more when the
#   output matrix is a float one (a tied F16 token embedding: ggml-cuda's float matrix-vector kernels;
#   the gemma shapes with Q8_0 and Q4_0 layers: 175 to 188 measured);
CUDA_HOST_SGEMM_BYTES = 308 * MiB
CUDA_HOST_NO_CUBLAS_BYTES = 164 * MiB
CUDA_HOST_FLOAT_OUTPUT_BYTES = 18 * MiB
# - on the host, an encoder (cuBLAS for its attention, without flash attention): 308 MiB, and 80 more
#   once a decode's batch (tokens × width) reaches 384 × 768, where cuBLAS takes two larger kernels
#   (a 768-wide BERT at windows of 128 to 512 and all-MiniLM-L6-v2, 384 wide, at 128 to 512, 2 a decode);
#   with quantized matrices 265 MiB, 20 more at that batch (all-MiniLM-L6-v2 Q8_0 at windows of 128 to
#   512: 265, 265 and 285 measured).
CUDA_ENCODER_HOST_BYTES = 308 * MiB
CUDA_ENCODER_HOST_QUANTIZED_BYTES = 265 * MiB
CUDA_ENCODER_LARGE_BATCH = 384 * 768
CUDA_ENCODER_LARGE_KERNELS_BYTES = 80 * MiB
CUDA_ENCODER_QUANTIZED_LARGE_KERNELS_BYTES = 20 * MiB
_FLOAT_TYPES = {"F16", "BF16", "F32"}


def cublas_use(header: GGUFHeader, first_gpu: int, settings: EngineSettings, last: int | None = None) -> str:
    """Which of cuBLAS's kernels a model offloaded from layer ``first_gpu`` up will load: "gemm"
    (half precision), "sgemm" (single precision only) or "" (none). ggml-cuda multiplies a batch of
    tokens by an offloaded float matrix with cuBLAS; not the lookups (token, position and type
    embeddings) nor the output, whose few rows a decode asks for go through its own kernels. Without
    flash attention (an encoder's) the attention itself runs on cuBLAS. ``last``: the last layer on
    that GPU (default: all from ``first_gpu`` up)."""
    return _cublas_use(header, first_gpu, settings.flash_attn, last=last)


def _cublas_use(header: GGUFHeader, first_gpu: int, flash_attn: bool, *, weights_only: bool = False,
                last: int | None = None) -> str:
    top = header.n_layers - 1 if last is None else min(last, header.n_layers - 1)
    if not weights_only and (header.architecture in ENCODER_ARCHITECTURES or not flash_attn):
        return "gemm"
    kinds = {kind for _, kind in _float_matrices(header, first_gpu, top)}
    return "gemm" if kinds - {"F32"} else "sgemm" if kinds else ""


def _float_matrices(header: GGUFHeader, first_gpu: int, top: int):
    """(tensor, type name) of each float matrix of layers ``first_gpu``..``top`` that a batch goes
    through cuBLAS with: not the lookups (token, position and type embeddings), not the output."""
    for t in header.tensors:
        layer = tensor_layer(t.name, header.n_layers)
        if layer is None or not first_gpu <= layer <= top or len(t.shape) < 2:
            continue
        kind = ggml_type_name(t.ggml_type)
        if kind in _FLOAT_TYPES and "embd" not in t.name and "token_types" not in t.name:
            yield t, kind


def cuda_context_bytes(header: GGUFHeader, first: int, settings: EngineSettings, last: int | None = None) -> int:
    """What a GPU holding layers ``first``..``last`` holds for a CUDA process beyond llama.cpp's buffers."""
    return CUDA_CONTEXT_BYTES - (0 if cublas_use(header, first, settings, last) else CUBLAS_DEVICE_BYTES)


def cuda_host_bytes(header: GGUFHeader, n_ctx: int, settings: EngineSettings, first_gpu: int = 0) -> int:
    """What the CUDA runtime holds in RAM for a model offloaded to this machine's GPUs (see above)."""
    if header.architecture in ENCODER_ARCHITECTURES:
        large = settings.encoder_tokens(n_ctx) * header.n_embd >= CUDA_ENCODER_LARGE_BATCH
        if not _cublas_use(header, first_gpu, settings.flash_attn, weights_only=True):
            return CUDA_ENCODER_HOST_QUANTIZED_BYTES + (CUDA_ENCODER_QUANTIZED_LARGE_KERNELS_BYTES if large else 0)
        return CUDA_ENCODER_HOST_BYTES + (CUDA_ENCODER_LARGE_KERNELS_BYTES if large else 0)
    use = cublas_use(header, first_gpu, settings)
    if use == "gemm":
        largest = _largest_float_dimension(header, first_gpu)
        return CUDA_HOST_BYTES + max([extra for at, extra in CUDA_HOST_GEMM_STEPS if largest >= at], default=0)
    if use == "sgemm":
        return CUDA_HOST_SGEMM_BYTES
    return CUDA_HOST_NO_CUBLAS_BYTES + (CUDA_HOST_FLOAT_OUTPUT_BYTES if _float_output(header) else 0)


def _largest_float_dimension(header: GGUFHeader, first_gpu: int) -> int:
    """The largest dimension of the offloaded half-precision matrices a batch goes through cuBLAS with."""
    return max((max(t.shape[:2]) for t, kind in _float_matrices(header, first_gpu, header.n_layers - 1)
                if kind != "F32"), default=0)


def _float_output(header: GGUFHeader) -> bool:
    """Whether the output matrix (the token embedding, when the output is tied to it) is a float one."""
    names = {t.name: t for t in header.tensors}
    out = names.get("output.weight") or names.get("token_embd.weight")
    return out is not None and ggml_type_name(out.ggml_type) in _FLOAT_TYPES


# Each further llama context on a GPU (an encoder's pool) beyond its compute buffer: its own CUDA
# streams, cuBLAS handles and ggml-cuda memory pool. Calibrated on an H200 (all-MiniLM-L6-v2 F16,
# 8 and 12 contexts: 1,493 and 1,961 MiB measured by NVML, 100 and 99 MiB a context beyond the rest).
CUDA_CONTEXT_EXTRA_BYTES = 100 * MiB
