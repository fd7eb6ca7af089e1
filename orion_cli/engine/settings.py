"""The llama.cpp settings orion loads with on this machine, from the engine check's verdict."""

from __future__ import annotations

from pathlib import Path

from ..enginecheck import EngineCheck, current_check, engine_key
from ..estimate import EngineSettings
from ._binding import model_params


def settings_for(check: EngineCheck, *, embedding: bool = False, offload: bool = False) -> EngineSettings:
    """The llama.cpp settings orion loads with (and estimates for) under an engine verdict.

    Encoders run with flash attention on the CPU (measured faster for all-MiniLM-L6-v2), but not on a
    GPU: CUDA's kernels have no head size 32 (MiniLM's), so the op falls back to the CPU between
    GPU layers (measured on an H200: 74 chunks/s with it, 519 without). An encoder on a GPU packs
    ENCODER_GPU_PACK sequences into each decode (fewer launches a chunk; on a CPU one sequence a
    decode is fastest). An LLM offloaded to a GPU runs with flash attention (llama.cpp's own choice
    there: no attention-score matrix in VRAM)."""
    pack = encoder_gpu_tuning()[1] if embedding and offload else 1
    return EngineSettings(repack=check.use_extra_bufts, amx=check.amx, flash_attn=embedding != offload,
                          embed_pack=pack)


def kv_settings(settings: EngineSettings, type_k: str = "f16", type_v: str = "f16") -> EngineSettings:
    """``settings`` with a KV cache of ``type_k``/``type_v``. llama.cpp quantizes V only with flash
    attention (it refuses the context otherwise), so a quantized V turns flash attention on."""
    from dataclasses import replace

    from ..estimate import KV_TYPES

    for name in (type_k, type_v):
        if name not in KV_TYPES:
            raise ValueError(f"unknown KV cache type {name!r} (one of {', '.join(KV_TYPES)})")
    flash = settings.flash_attn or type_v != "f16"
    return replace(settings, type_k=type_k, type_v=type_v, flash_attn=flash)


# Sequences an encoder on a GPU decodes together. Measured on an H200 (all-MiniLM-L6-v2 F16, 4,000
# chunks of 700 characters, 8 contexts): 1 → 2,031 chunks/s, 2 → 2,472, 4 → 1,167, 8 → 824 (the
# non-causal mask spans the whole micro-batch: its cost grows with the square of the packed length).
ENCODER_GPU_PACK = 2
ENCODER_GPU_CONTEXTS = 8  # see orion_cli.placement.encoder_contexts (measured there, the grid below too)
# Measured again on an H200 on 2026-12-02 (bench/gpu.py grid, 6,000 chunks of 700 characters, F16): 8
# contexts x 2 a decode 2,616 chunks/s, then 16 x 2 2,311, 16 x 4 1,842, 8 x 4 1,774, 16 x 1 1,656, 8 x 8
# 1,564, 8 x 1 1,514, 16 x 8 1,097. Decodes padded to a fixed shape (a filler sequence up to a multiple of
# 32 tokens, so that ggml-cuda could replay each as a CUDA graph) gained nothing (2,276 against 2,616 at
# 8 x 2), and CUDA graphs off changed 8 x 2 by 1 % (2,591): the time is not in kernel launches.


def encoder_gpu_tuning() -> tuple[int, int]:
    """An encoder's (contexts, sequences a decode) on a GPU: orion's measured choice, or
    ``ORION_ENCODER_GPU="CONTEXTS,PACK"`` (for benchmarks that compare settings; docs/benchmarks.md)."""
    import os

    value = os.environ.get("ORION_ENCODER_GPU", "").strip()
    if not value:
        return ENCODER_GPU_CONTEXTS, ENCODER_GPU_PACK
    from ..errors import InvalidValue

    try:
        contexts, pack = (int(v) for v in value.split(","))
    except ValueError:
        contexts = pack = 0
    if not (1 <= contexts <= 64 and 1 <= pack <= 64):
        raise InvalidValue(f"ORION_ENCODER_GPU={value!r} is not CONTEXTS,PACK",
                           hint="two whole numbers from 1 to 64, e.g. 8,2")
    return contexts, pack


def machine_check() -> EngineCheck | None:
    """The engine check's cached verdict for this machine (None before any check has run)."""
    from ..device import cpu_info
    from ..enginecheck import cached_check

    model, flags, _ = cpu_info()
    return cached_check(engine_key(model, flags))


def machine_settings(*, embedding: bool = False, kv_type: tuple[str, str] = ("f16", "f16")) -> EngineSettings:
    """The settings loads use on this machine, for estimates made without loading (list, inspect,
    fetch, eval): from the engine check's cached verdict; llama.cpp's defaults before any check
    has run (``orion profile`` runs it). Never runs the canary itself. ``kv_type``: the strategy's
    KV cache (K, V) types, as its loads use them (an encoder has no KV cache: left f16)."""
    check = machine_check()
    settings = settings_for(check, embedding=embedding) if check else EngineSettings(flash_attn=embedding)
    return settings if embedding else kv_settings(settings, *kv_type)


def peer_llama(path: Path | str, *, check: EngineCheck | None = None, **kwargs):
    """llama-cpp-python's own ``Llama``, loaded with the engine check's settings.

    For peers in benchmarks and independent checks in tests: where llama.cpp's
    defaults crash (GCC-built AMX kernels on Intel Xeons), a plain ``Llama()``
    would crash too, so nothing loads a model outside these settings.
    """
    check = check or current_check()
    with model_params(use_extra_bufts=check.use_extra_bufts):
        from llama_cpp import Llama

        return Llama(str(path), **kwargs)
