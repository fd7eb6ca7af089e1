"""The engine: the only package of orion that imports ``llama_cpp``.

A small typed surface over llama-cpp-python, a module a job:

- :mod:`.loader`: :func:`load` (after the GGUF header has been validated, so llama.cpp never sees a
  malformed file) with the settings of :mod:`.settings` (from the engine check's verdict);
- :mod:`.model`: :class:`LoadedModel` (generate, tokenize, perplexity, close), :mod:`.encoder_pool`
  (an encoder's contexts side by side), :mod:`.decoder` (one decode loop for every text request,
  several sequences a step) with the one sampler chain of :mod:`.sampling`;
- :mod:`.runner` and :mod:`.runner_model`: a model in a process of its own (``orion serve``'s
  models), answering as a :class:`LoadedModel` does, so a native fault ends that process only;
- :mod:`.children`: the canary, the quantizer and the RPC server, in child processes that report
  typed errors; :mod:`.ggml_rpc`: ggml's RPC backend; :mod:`.logs`: native logs silent unless
  ``--debug``; :mod:`._binding`: every reach-in past llama-cpp-python's public API.

Importing this package does not import ``llama_cpp`` (0.3 s): each function does, when called.
On Intel Xeons with AMX inside a VM llama.cpp's extra buffer types crash at the first decode of a
quantized model (llama.cpp issue #20824): the engine check (:mod:`orion_cli.enginecheck`) finds
it with a canary child, and every load uses its verdict.
"""

from __future__ import annotations

from ..enginecheck import (
    EngineCheck,
    EngineCrashed,
    canary_command,
    check_engine,
    current_check,
    engine_key,
)
from ._binding import load_library
from .children import build_features, quantize_command, rpc_server_command
from .decoder import ParallelDecoder, prompt_too_long
from .dryrun import DryRun, DryRunFailed, dry_run, dry_run_key, header_digest
from .ggml_rpc import local_gpu_devices, rpc_supported
from .loader import LoadCancelled, load, validate
from .model import LoadedModel
from .prompts import prompt_tokens
from .runner_model import RUNNER_BASE_BYTES, RunnerGone, RunnerModel, start_runner
from .sampling import Sampling
from .settings import (
    ENCODER_GPU_PACK,
    machine_check,
    machine_settings,
    peer_llama,
    settings_for,
)
from .spec import LoadSpec, Timings

__all__ = [
    "ENCODER_GPU_PACK", "EngineCheck", "EngineCrashed", "LoadCancelled", "LoadSpec", "LoadedModel", "ParallelDecoder",
    "Sampling", "Timings", "build_features", "canary_command", "check_engine", "current_check", "engine_key",
    "load", "local_gpu_devices", "machine_check", "machine_settings", "peer_llama", "prompt_tokens",
    "prompt_too_long", "quantize_command", "rpc_server_command", "rpc_supported", "settings_for", "validate",
    "RUNNER_BASE_BYTES", "RunnerGone", "RunnerModel", "start_runner",
    "DryRun", "DryRunFailed", "dry_run", "dry_run_key", "header_digest", "load_library",
]
