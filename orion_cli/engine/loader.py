"""Loading: a model file validated (llama.cpp never sees a malformed header), then ``Llama()`` with the
settings the engine check recorded, on the devices the placement chose."""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path
from typing import Callable

from .._debug import debug_enabled
from ..enginecheck import EngineCheck, current_check
from ..errors import NotAGGUF, OrionError
from ..estimate import KV_TYPE_IDS
from ..gguf_header import GGUFHeader, read_local_header
from . import ggml_rpc
from ._binding import context_params, init_projector, model_params
from .logs import capture_llama_log, route_llama_log, silence_mtmd
from .model import LoadedModel
from .spec import LoadSpec


class LoadCancelled(OrionError):
    exit_code = 130


def validate(path: Path) -> GGUFHeader:
    """The header of a model file, checked before llama.cpp sees it."""
    header = read_local_header(path)
    if not header.tensors:
        raise NotAGGUF(f"{path} has no tensors", hint="it is not a model")
    return header


def load(
    spec: LoadSpec,
    *,
    check: EngineCheck | None = None,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    dry_run_log: list[str] | None = None,
) -> LoadedModel:
    """Load a model (validated first) with the settings the engine check recorded.

    ``dry_run_log``: llama.cpp's dry run instead (:mod:`.dryrun`): the same parameters with
    ``no_alloc`` and no mmap, nothing allocated and no weight read, llama.cpp's log appended to the
    list; the model returned is for nothing but its log (the projector is not loaded)."""
    header = validate(spec.path)
    if spec.projector is not None and dry_run_log is None:
        validate(spec.projector)
    check = check or current_check()

    def on_progress(value: float) -> bool:
        if progress:
            progress(value)
        return not (cancel is not None and cancel.is_set())

    start = time.perf_counter()
    verbose = debug_enabled() and dry_run_log is None
    if dry_run_log is not None:
        capture_llama_log(dry_run_log)
    else:
        route_llama_log(verbose)
    s = spec.settings
    parallel = {"n_seq_max": spec.parallel, "kv_unified": True} if spec.parallel > 1 else {}
    if spec.embedding and s.embed_pack > 1:
        parallel = {"n_seq_max": s.embed_pack}
    if not spec.embedding and not spec.whole_window:
        # a text decode asks for one output a sequence (its last token): llama.cpp's compute buffers are
        # then sized for that many, not for a whole micro-batch of logits (n_ubatch x the vocabulary:
        # 512 MiB for gemma3's 262,144 tokens)
        parallel["n_outputs_max"] = max(1, spec.parallel)
    dry = {"no_alloc": True} if dry_run_log is not None else {}
    devices = {}
    if spec.rpc_servers:  # the devices, in llama.cpp's order: the servers', then this machine's GPUs
        chosen = ggml_rpc.rpc_devices(spec.rpc_servers) + ggml_rpc.local_gpu_devices()
        array = (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)  # NULL-terminated; alive through the load
        devices = {"devices": ctypes.addressof(array)}
    with model_params(progress=on_progress, use_extra_bufts=check.use_extra_bufts and s.repack, **devices, **dry), \
            context_params(**parallel):
        from llama_cpp import Llama

        chat_handler = None
        if spec.projector is not None and dry_run_log is None:
            from llama_cpp.llama_chat_format import Llava15ChatHandler

            if not verbose:
                silence_mtmd()

            chat_handler = Llava15ChatHandler(clip_model_path=str(spec.projector), verbose=verbose)
        try:
            # an encoder or a scored window is evaluated whole, in one batch
            n_batch = max(s.n_ubatch, spec.n_ctx) if (spec.embedding or spec.whole_window) else s.n_ubatch
            n_ctx = spec.n_ctx
            if spec.embedding:  # embed_pack sequences a decode
                n_ctx = n_batch = s.encoder_tokens(spec.n_ctx)
            llm = Llama(
                str(spec.path), n_ctx=n_ctx, n_threads=spec.threads, n_threads_batch=spec.threads,
                n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=spec.n_gpu_layers,
                tensor_split=list(spec.tensor_split) or None,
                swa_full=s.swa_full, flash_attn=s.flash_attn, embedding=spec.embedding,
                type_k=KV_TYPE_IDS[s.type_k], type_v=KV_TYPE_IDS[s.type_v],
                chat_handler=chat_handler, verbose=verbose, use_mmap=dry_run_log is None,
            )
        except ValueError as exc:
            if cancel is not None and cancel.is_set():
                raise LoadCancelled(f"loading {spec.path.name} was cancelled") from exc
            raise NotAGGUF(f"llama.cpp could not load {spec.path}: {exc}",
                           hint="run with --debug to see llama.cpp's log") from exc
        if chat_handler is not None:
            # Load the projector now, not at the first image: a projector that does not
            # match the model (its output size is not the model's embedding size) fails here.
            try:
                init_projector(chat_handler, llm)
            except ValueError as exc:
                llm.close()
                raise NotAGGUF(f"the projector {spec.projector} does not fit {spec.path.name}: {exc}",
                               hint="use the mmproj file published with this model; --debug shows why") from exc
    model = LoadedModel(spec, header, llm, chat_handler, time.perf_counter() - start)
    if spec.rpc_servers:
        ggml_rpc.track(spec.rpc_servers)  # the servers a lost connection is looked for among
    return model
