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
    _, pack, bucket = encoder_gpu_tuning() if embedding and offload else (1, 1, 0)
    return EngineSettings(repack=check.use_extra_bufts, amx=check.amx, flash_attn=embedding != offload,
                          embed_pack=pack, embed_bucket=bucket)


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
# An encoder's decodes on a GPU padded to a multiple of this many tokens (EngineSettings.embed_bucket):
# CUDA graphs replay them (0: off).
ENCODER_GPU_BUCKET = 0
ENCODER_GPU_CONTEXTS = 8  # see orion_cli.placement.encoder_contexts


def encoder_gpu_tuning() -> tuple[int, int, int]:
    """An encoder's (contexts, sequences a decode, bucket) on a GPU: orion's measured choice, or
    ``ORION_ENCODER_GPU="CONTEXTS,PACK,BUCKET"`` (benchmarks that compare settings; see docs)."""
    import os

    value = os.environ.get("ORION_ENCODER_GPU", "").strip()
    if not value:
        return ENCODER_GPU_CONTEXTS, ENCODER_GPU_PACK, ENCODER_GPU_BUCKET
    from ..errors import InvalidValue

    try:
        contexts, pack, bucket = (int(v) for v in value.split(","))
    except ValueError:
        contexts = 0
    if not (1 <= contexts <= 64 and 1 <= pack <= 64 and 0 <= bucket <= 4096):
        raise InvalidValue(f"ORION_ENCODER_GPU={value!r} is not CONTEXTS,PACK,BUCKET",
                           hint="three whole numbers, e.g. 8,2,0 (contexts 1-64, pack 1-64, bucket 0-4096)")
    return contexts, pack, bucket


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
