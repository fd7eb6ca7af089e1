"""GPU offload: device descriptions, the tier rule with GPUs, the offload plan, the manager's VRAM
budget and fetch's choice. No GPU is needed: the devices are recorded (nvidia-smi output of an
H200 and of two A100s, NVML's answers through a stand-in module) and the models are GGUF headers."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from orion_cli.cuda_runtime import (
    CUBLAS_DEVICE_BYTES,
    CUDA_CONTEXT_BYTES,
    CUDA_HOST_BYTES,
    CUDA_HOST_FLOAT_OUTPUT_BYTES,
    CUDA_HOST_NO_CUBLAS_BYTES,
    CUDA_HOST_SGEMM_BYTES,
    cublas_use,
)
from orion_cli.device import GPUInfo, detect_gpus, parse_cuda_version, parse_nvidia_smi
from orion_cli.estimate import (
    EngineSettings,
    estimate_gpu,
    estimate_memory,
    kv_per_layer,
)
from orion_cli.gguf_header import ArrayInfo, GGUFHeader, TensorInfo
from orion_cli.offload import layers_per_gpu, plan_offload

FIXTURES = Path(__file__).parent / "fixtures"
MiB, GiB = 1024**2, 1024**3
Q4_K, Q6_K, F32 = 12, 14, 0


def llama_header(n_layers=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, n_vocab=128256) -> GGUFHeader:
    """The header of a 1B llama in Q4_K (the shape bench/gpu.py measured on an H200)."""
    def q4k(name, rows, cols):
        return TensorInfo(name, (cols, rows), Q4_K, 0, rows * cols // 256 * 144)

    head_dim = n_embd // n_head
    tensors = [q4k("token_embd.weight", n_vocab, n_embd), TensorInfo("output_norm.weight", (n_embd,), F32, 0, n_embd * 4),
               TensorInfo("output.weight", (n_embd, n_vocab), Q6_K, 0, n_vocab * n_embd // 256 * 210)]
    for i in range(n_layers):
        tensors += [TensorInfo(f"blk.{i}.attn_norm.weight", (n_embd,), F32, 0, n_embd * 4),
                    q4k(f"blk.{i}.attn_q.weight", n_embd, n_embd), q4k(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd),
                    q4k(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd),
                    q4k(f"blk.{i}.attn_output.weight", n_embd, n_embd),
                    q4k(f"blk.{i}.ffn_gate.weight", n_ff, n_embd), q4k(f"blk.{i}.ffn_up.weight", n_ff, n_embd),
                    q4k(f"blk.{i}.ffn_down.weight", n_embd, n_ff)]
    meta = {"general.architecture": "llama", "llama.block_count": n_layers, "llama.embedding_length": n_embd,
            "llama.feed_forward_length": n_ff, "llama.attention.head_count": n_head,
            "llama.attention.head_count_kv": n_head_kv, "llama.context_length": 131072,
            "tokenizer.ggml.tokens": ArrayInfo(8, n_vocab), "general.file_type": 15}
    return GGUFHeader("llama-1b", 3, meta, tuple(tensors), None)


GPU_SETTINGS = EngineSettings(repack=False, flash_attn=True)


def with_types(h: GGUFHeader, kind: int, names=lambda name: name.startswith("blk.")) -> GGUFHeader:
    """``h`` with the 2-D tensors whose names ``names`` accepts stored as ggml type ``kind``."""
    return replace(h, tensors=tuple(replace(t, ggml_type=kind) if len(t.shape) == 2 and names(t.name) else t
                                    for t in h.tensors))


def test_cuda_runtime_follows_which_cublas_kernels_the_matrices_need():
    """ggml-cuda multiplies a batch by an offloaded float matrix through cuBLAS, whose kernels cost
    ~96 MiB of VRAM and 140-180 MiB of RAM (docs/benchmarks.md); quantized matrices use its own."""
    q = llama_header()
    f16 = with_types(q, 1)
    router = replace(q, tensors=q.tensors + (TensorInfo("blk.3.ffn_gate_inp.weight", (2048, 8), F32, 0, 2048 * 8 * 4),))
    assert cublas_use(q, 0, GPU_SETTINGS) == ""  # the Q6_K output and the Q4_K lookups do not count
    assert cublas_use(with_types(q, 1, lambda n: n in ("token_embd.weight", "output.weight")), 0, GPU_SETTINGS) == ""
    assert cublas_use(f16, 0, GPU_SETTINGS) == "gemm"
    assert cublas_use(router, 0, GPU_SETTINGS) == "sgemm"
    assert cublas_use(router, 4, GPU_SETTINGS) == ""  # layer 3, where the F32 matrix is, stays on the CPU
    assert cublas_use(q, 0, replace(GPU_SETTINGS, flash_attn=False)) == "gemm"  # the attention itself
    small_f16 = with_types(llama_header(n_embd=896, n_ff=4864, n_head=14, n_head_kv=2), 1)
    mid_f16 = with_types(llama_header(n_embd=1024, n_ff=5632, n_head=16), 1)
    tied_f16_out = replace(q, tensors=tuple(t for t in q.tensors if t.name != "output.weight"))
    tied_f16_out = with_types(tied_f16_out, 1, lambda n: n == "token_embd.weight")
    for h, gpu, host in ((q, CUDA_CONTEXT_BYTES - CUBLAS_DEVICE_BYTES, CUDA_HOST_NO_CUBLAS_BYTES),
                         (tied_f16_out, CUDA_CONTEXT_BYTES - CUBLAS_DEVICE_BYTES,
                          CUDA_HOST_NO_CUBLAS_BYTES + CUDA_HOST_FLOAT_OUTPUT_BYTES),
                         (small_f16, CUDA_CONTEXT_BYTES, CUDA_HOST_BYTES),  # n_ff 4,864: the base kernels
                         (mid_f16, CUDA_CONTEXT_BYTES, CUDA_HOST_BYTES + 38 * MiB),  # n_ff 5,632
                         (f16, CUDA_CONTEXT_BYTES, CUDA_HOST_BYTES + 73 * MiB),  # n_ff 8,192 (the vocabulary does not count)
                         (router, CUDA_CONTEXT_BYTES, CUDA_HOST_SGEMM_BYTES)):
        plan = plan_offload(h, 4096, GPU_SETTINGS, [80 * GiB])
        assert plan.full and plan.gpus[0].runtime_bytes == gpu
        base = estimate_memory(h, 4096, GPU_SETTINGS, n_gpu_layers=0).overhead_bytes
        assert plan.cpu.overhead_bytes - base == host


# ---------------------------------------------------------------- device descriptions


def test_recorded_h200_and_cuda_version():
    gpus = parse_nvidia_smi((FIXTURES / "nvidia-smi-1xH200.csv").read_text(),
                            parse_cuda_version((FIXTURES / "nvidia-smi-header.txt").read_text()))
    assert gpus == (GPUInfo(0, "NVIDIA H200", 143771 * MiB, 143156 * MiB, "580.159.04", "9.0", "13.0"),)
    assert gpus[0].used_bytes == 615 * MiB
    assert parse_cuda_version("no such line") is None


def test_nvidia_smi_fallback_asks_for_compute_capability_then_without(monkeypatch):
    import orion_cli.device as device_mod

    monkeypatch.setattr(device_mod, "_nvml_gpus", lambda: None)
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    old = (FIXTURES / "nvidia-smi-2xA100.csv").read_text()  # a driver without compute_cap
    header = (FIXTURES / "nvidia-smi-header.txt").read_text()
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if len(cmd) == 1:
            return subprocess.CompletedProcess(cmd, 0, header, "")
        if "compute_cap" in cmd[1]:
            return subprocess.CompletedProcess(cmd, 2, "", 'Field "compute_cap" is not a valid field to query.')
        return subprocess.CompletedProcess(cmd, 0, old, "")

    gpus = detect_gpus(run=run)
    assert [g.name for g in gpus] == ["NVIDIA A100-SXM4-80GB"] * 2
    assert gpus[0].compute_capability is None and gpus[0].cuda_version == "13.0"
    assert len(calls) == 3


def test_nvml_answers(monkeypatch):
    """NVML (nvidia-ml-py) first: names, memory, compute capability, driver and CUDA version."""
    mem = [types.SimpleNamespace(total=80 * GiB, free=79 * GiB), types.SimpleNamespace(total=80 * GiB, free=10 * GiB)]
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15", nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3", nvmlDeviceGetMemoryInfo=lambda h: mem[h],
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = detect_gpus(run=lambda *a, **k: pytest.fail("nvidia-smi is not needed when NVML answers"))
    assert gpus == (GPUInfo(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, "550.54.15", "9.0", "12.4"),
                    GPUInfo(1, "NVIDIA H100 80GB HBM3", 80 * GiB, 10 * GiB, "550.54.15", "9.0", "12.4"))


# ---------------------------------------------------------------- the tier rule


def _device(ram, gpus=()):
    from orion_cli.device import DeviceInfo

    return DeviceInfo(ram, ram, ram, "physical RAM", 0, None, "cpu", 8, 16, 16, ("AVX2",), tuple(gpus),
                      100 * GiB, "/", "Linux", "x86_64")


def test_tier_rule_counts_vram_when_the_build_can_offload():
    from orion_cli.strategy import build_strategy

    gpu = GPUInfo(0, "laptop GPU", 4 * GiB, 3 * GiB)
    s = build_strategy(_device(3 * GiB, [gpu]))
    assert s.tier == "light" and "3.0 GiB + 4.0 GiB VRAM = 7.0 GiB" in s.tier_reason
    assert s.n_gpu_layers == "auto"
    # the VRAM other processes hold (1 GB) is out of the budget: 4 GB × 0.75 − 1 GB
    assert s.gpu_budget_bytes == int(4 * GiB * 0.75) - 1 * GiB
    cpu_only = build_strategy(_device(3 * GiB, [gpu]), gpu_offload=False)
    assert cpu_only.tier == "balanced" and cpu_only.n_gpu_layers == 0 and cpu_only.gpu_budget_bytes is None


def test_two_recorded_gpus_budgets():
    from orion_cli.budget import gpu_budgets
    from orion_cli.strategy import build_strategy

    gpus = parse_nvidia_smi((FIXTURES / "nvidia-smi-2xA100.csv").read_text())
    s = build_strategy(_device(64 * GiB, gpus))
    assert s.tier == "minimal"
    each = gpu_budgets(gpus, 0.75)
    # GPU 1 has 1 GB free: other processes hold 79 GB, more than its high-pressure line
    assert each == [int(81920 * MiB * 0.75) - (81920 - 80512) * MiB, 0]
    assert s.gpu_budget_bytes == sum(each)
    assert gpu_budgets(gpus, 0.75, total_cap=10 * GiB) == [10 * GiB, 0]


# ---------------------------------------------------------------- the plan


def test_full_offload_when_it_fits():
    h = llama_header()
    plan = plan_offload(h, 4096, GPU_SETTINGS, [20 * GiB])
    assert plan.full and plan.n_gpu_layers == 17 and plan.gpu_fits
    g = plan.gpus[0]
    embd = next(t.n_bytes for t in h.tensors if t.name == "token_embd.weight")
    assert g.weights_bytes == h.tensor_bytes - embd  # the input embedding stays on the CPU
    assert g.kv_bytes == sum(kv_per_layer(h, 4096, GPU_SETTINGS)) == 16 * 4096 * 2 * 8 * 64 * 2
    # orion's loads ask for one output a sequence: the feed-forward activations dominate the compute buffer
    assert g.compute_bytes == 512 * 4 * 4 * 8192 + 4096 * 512 * 2
    assert g.runtime_bytes == CUDA_CONTEXT_BYTES - CUBLAS_DEVICE_BYTES  # quantized matrices: no cuBLAS
    assert plan.cpu.kv_bytes == 0 and plan.cpu.weights_bytes == embd  # only the input embedding stays in RAM


@pytest.mark.parametrize("kv,measured", [("f16", (1522.8, 1678.8, 2302.8)), ("q8_0", (1500.8, 1590.8, 1950.8))])
def test_recorded_h200_vram_within_tolerance(kv, measured):
    """bench/estimate.py on an H200 (docs/benchmarks.md): NVML's growth for a random-weight 0.5B llama
    (24 layers, 896 wide, GQA 14/2, 32,000 tokens, F16; its recorded header), every layer offloaded, at
    4,096 / 16,384 / 65,536 cells. The formula alone (what a what-if uses) within 1.5 % of each."""
    import json

    from orion_cli.gguf_header import _header_from_json

    h = _header_from_json(json.loads((FIXTURES / "llama-0.5b-f16-header.json").read_text()))
    settings = replace(GPU_SETTINGS, type_k=kv, type_v=kv)
    for n_ctx, nvml in zip((4096, 16384, 65536), measured):
        plan = plan_offload(h, n_ctx, settings, [100 * GiB])
        assert plan.full
        assert abs(plan.gpu_bytes / MiB - nvml) / nvml < 0.015, (n_ctx, plan.gpu_bytes / MiB, nvml)


def test_partial_offload_takes_the_top_layers():
    h = llama_header()
    full = plan_offload(h, 4096, GPU_SETTINGS, [20 * GiB]).gpus[0]
    budget = full.total_bytes - (full.weights_bytes + full.kv_bytes) // 2
    plan = plan_offload(h, 4096, GPU_SETTINGS, [budget])
    assert 1 < plan.n_gpu_layers < 17 and plan.gpu_fits
    first, last = plan.gpus[0].layers
    assert last == 16 and first == 17 - plan.n_gpu_layers  # the output (layer 16) and the last repeating ones
    more = plan_offload(h, 4096, GPU_SETTINGS, [budget], plan.n_gpu_layers + 1)
    assert not more.gpu_fits  # one more layer would not fit: auto took the most that do
    # the CPU keeps the rest: their KV cache and the runtime
    assert plan.cpu.kv_bytes == sum(kv_per_layer(h, 4096, GPU_SETTINGS)[:first])
    assert "of 17 layers on the GPU" in plan.describe()


def test_nothing_fits_then_cpu_and_explicit_counts():
    h = llama_header()
    assert plan_offload(h, 4096, GPU_SETTINGS, [100 * MiB]).n_gpu_layers == 0
    assert plan_offload(h, 4096, GPU_SETTINGS, []).describe() == "all 17 layers on the CPU (no GPU)"
    assert plan_offload(h, 4096, GPU_SETTINGS, [20 * GiB], can_offload=False).n_gpu_layers == 0
    assert plan_offload(h, 4096, GPU_SETTINGS, [20 * GiB], -1).n_gpu_layers == 17
    assert plan_offload(h, 4096, GPU_SETTINGS, [20 * GiB], 99).n_gpu_layers == 17
    assert plan_offload(h, 4096, GPU_SETTINGS, [20 * GiB], 0).n_gpu_layers == 0
    # without offload the CPU estimate is the plain one
    cpu = plan_offload(h, 4096, EngineSettings(), [], "auto").cpu
    assert cpu == estimate_memory(h, 4096, EngineSettings())


def test_two_gpus_split_like_llama_cpp():
    """Layer il goes to the first GPU whose cumulative share exceeds (il - first) / offloaded."""
    assert layers_per_gpu(16, 17, [1, 1]) == [(0, 8), (9, 16)]
    assert layers_per_gpu(16, 17, [3, 1]) == [(0, 12), (13, 16)]
    assert layers_per_gpu(16, 5, [1, 1]) == [(12, 14), (15, 16)]
    h = llama_header()
    plan = plan_offload(h, 4096, GPU_SETTINGS, [10 * GiB, 10 * GiB])
    assert plan.full and plan.tensor_split == (0.5, 0.5)
    one, two = plan.gpus
    assert one.compute_bytes <= two.compute_bytes  # the output layer's GPU adds the logits of one output
    assert one.runtime_bytes == two.runtime_bytes == CUDA_CONTEXT_BYTES - CUBLAS_DEVICE_BYTES  # a CUDA context each
    assert estimate_gpu(h, 4096, GPU_SETTINGS, 9, 16).total_bytes == two.total_bytes


# ---------------------------------------------------------------- the manager


def test_manager_counts_vram_apart_from_ram():
    from orion_cli.manager import ModelDoesNotFit, ModelManager, Request

    class Model:
        def close(self):
            pass

    m = ModelManager(max_models=4, budget_bytes=10 * GiB, keep_alive_s=None, gpu_budget_bytes=8 * GiB)

    def request(key, ram, vram):
        return Request(key, key, ram, lambda cancel: Model(), gpu_bytes=vram)

    m.load(request("a", 1 * GiB, 5 * GiB))
    m.load(request("b", 1 * GiB, 2 * GiB))
    assert [s.gpu_bytes for s in m.status()] == [2 * GiB, 5 * GiB]
    m.load(request("c", 1 * GiB, 3 * GiB))  # 10 GB of VRAM asked: the least recently used goes
    assert [s.name for s in m.status()] == ["c", "b"]
    with pytest.raises(ModelDoesNotFit, match="of VRAM, the GPU budget is 8.0 GiB"):
        m.load(request("d", 1 * GiB, 9 * GiB))


def test_an_encoders_pool_on_a_gpu_counts_each_context():
    """all-MiniLM-L6-v2 F16 (its recorded header), every layer offloaded as orion loads an encoder on
    a GPU (2 sequences a decode, no flash attention): the pool's VRAM against what NVML measured on
    an H200 (bench/gpu.py: 8 contexts 1,493 MiB, 12 contexts 1,961 MiB). That run embedded a corpus
    of ~200-token chunks only; a server also meets short inputs, whose batch shapes load cuBLAS's
    small-batch kernels (the same model swept over every size, one context: 697 MiB of CUDA runtime
    against the 608 of that run), which the estimate counts: 84 MiB above the recorded figures."""
    import json

    from orion_cli.gguf_header import _header_from_json
    from orion_cli.engine.settings import ENCODER_GPU_CONTEXTS
    from orion_cli.placement import encoder_contexts, pool_extra_bytes

    h = _header_from_json(json.loads((FIXTURES / "minilm-f16-header.json").read_text()))
    settings = EngineSettings(repack=False, flash_attn=False, embed_pack=2)
    plan = plan_offload(h, 256, settings, [100 * GiB], -1, embedding=True)
    assert plan.n_gpu_layers == plan.n_total
    for contexts, measured in [(8, 1493 * MiB), (12, 1961 * MiB)]:
        estimate = plan.gpu_bytes + pool_extra_bytes(plan, contexts)[1]
        assert abs(estimate - 84 * MiB - measured) / measured < 0.02, (contexts, estimate / MiB)
    # packing two sequences doubles the micro-batch the compute buffer holds
    single = plan_offload(h, 256, EngineSettings(repack=False, flash_attn=False), [100 * GiB], -1, embedding=True)
    assert plan.gpus[0].compute_bytes > single.gpus[0].compute_bytes
    # the pool is sized from the budget: room for the model and each further context, at most the cap
    assert encoder_contexts(plan, 16) == ENCODER_GPU_CONTEXTS
    # each further context holds its compute and output buffers' host side in RAM too
    assert pool_extra_bytes(plan, 8)[0] == 7 * plan.cpu.compute_bytes > 0
    per_context = pool_extra_bytes(plan, 2)[1]
    tight = plan_offload(h, 256, settings, [plan.gpu_bytes + 2 * per_context + MiB], -1, embedding=True)
    assert encoder_contexts(tight, 16) == 3
    # on the CPU a context costs its compute buffer in RAM and nothing on a GPU
    cpu = plan_offload(h, 256, EngineSettings(flash_attn=True), [], 0, embedding=True)
    assert pool_extra_bytes(cpu, 4) == (3 * cpu.cpu.compute_bytes, 0) and encoder_contexts(cpu, 2) == 2
