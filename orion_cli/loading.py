"""From a MODEL argument to a model in the manager: resolve, fetch if absent, estimate, build the load.

Shared by ``orion run``, ``embed``, ``eval`` and ``serve``: :func:`local_model` (a name, repo or path
to a file here), :func:`model_request` (its estimate and load, for the manager), :func:`encoder_model`
(an encoder's GGUF, converted on first use) and :func:`manager_for` (the manager a strategy sizes).
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Callable

from .errors import DoesNotFit, InvalidValue, NotFound, WrongModelKind
from .estimate import ENCODER_ARCHITECTURES, estimate_memory
from .gguf_header import read_local_header
from .manager import ModelManager, Request
from .placement import encoder_contexts, exact_plan, gpu_budgets_now, offload_plan, pool_extra_bytes
from .models import PATH_HINT, LocalModel, Registry, on_disk, resolve, user_path
from .strategy import Strategy
from .units import format_bytes

IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif", b"BM": "bmp",
}


def local_model(text: str, strategy: Strategy, *, fetch_progress: Callable | None = None,
                registry: Registry | None = None) -> LocalModel:
    """The model a MODEL argument names, on this machine; a model not here is fetched (--auto) first."""
    from ._text import clip

    registry = registry or Registry()
    ref = resolve(text, registry)
    if ref.source == "registry":
        if not on_disk(Path(ref.local.path)):
            raise NotFound(f"{ref.name}'s file is gone: {clip(ref.local.path, 200)}",
                           hint=f"run 'orion rm {ref.name}', then fetch or import it again")
        return ref.local
    if ref.source == "path":
        if not on_disk(ref.path):  # a name too long for a file names none
            raise NotFound(f"no such file: {clip(ref.path, 200)}", hint="check the path")
        if ref.path.is_dir():
            from .errors import NotAGGUF

            raise NotAGGUF(f"{ref.path} is a directory, not a GGUF file", hint="pass the .gguf file inside it")
        header = read_local_header(ref.path)
        kind = "encoder" if header.architecture in ENCODER_ARCHITECTURES else "llm"
        return LocalModel(name=ref.path.stem, kind=kind, path=str(ref.path.absolute()), source="path",
                          file_type=header.file_type, size_bytes=ref.path.stat().st_size)
    if ref.format != "gguf":
        raise WrongModelKind(f"{text} is an encoder published as safetensors", hint="orion run needs a GGUF LLM")
    from .fetch import fetch, plan_fetch

    plan = plan_fetch(ref, strategy)
    on_file, on_bytes = fetch_progress if fetch_progress else (None, None)
    return fetch(plan, registry=registry, on_file=on_file, on_bytes=on_bytes)


def check_image(path: Path) -> Path:
    from ._text import clip

    path = user_path(str(path), hint=PATH_HINT)  # ~user for a user not here: NotFound
    if not (on_disk(path) and path.is_file()):  # a name too long for a file names none
        raise NotFound(f"no such image: {clip(path, 200)}", hint="check the path given to --image")
    with path.open("rb") as f:
        head = f.read(12)
    if not any(head.startswith(m) for m in IMAGE_MAGIC) and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise InvalidValue(f"{path} is not an image (PNG, JPEG, GIF, BMP or WebP)", hint="pass an image file")
    return path


def check_model_kind(name: str, header, *, embedding: bool) -> None:
    """An encoder asked to write text, or a text model asked for embeddings: one clear error."""
    if embedding and header.architecture not in ENCODER_ARCHITECTURES:
        raise WrongModelKind(f"{name} is not an encoder ({header.architecture} writes text)",
                           hint="embeddings need an encoder: minilm, a BERT repo, folder or GGUF")
    if not embedding and header.architecture in ENCODER_ARCHITECTURES:
        raise WrongModelKind(f"{name} is an encoder ({header.architecture}): it makes embeddings, not text",
                           hint=f"use it with 'orion embed --model {name}' or /v1/embeddings")


def model_request(model: LocalModel, strategy: Strategy, *, n_ctx: int | None = None, threads: int | None = None,
                  check=None, progress: Callable[[float], None] | None = None, embedding: bool = False,
                  parallel: int = 1, contexts: int | None = None, runner: bool = False) -> Request:
    """A manager request for a local model: its estimate (RAM and VRAM, from the offload plan), its
    load, and what would fit instead. An encoder gets a pool of ``contexts`` (default: sized
    for where it runs, :func:`encoder_contexts`), each counted in the estimate. ``runner``: the
    model loads in a process of its own (:class:`orion_cli.engine.RunnerModel`, the server's way)."""
    from . import engine

    n_ctx = n_ctx or strategy.n_ctx
    threads = threads or strategy.threads
    check = check or engine.current_check()
    header = engine.validate(Path(model.path))
    check_model_kind(model.path if model.source == "path" else model.name, header, embedding=embedding)
    projector = Path(model.projector_path) if model.projector_path else None
    proj_header = read_local_header(projector) if projector else None
    # a runner process's own memory (the interpreter, llama_cpp, numpy) comes with the model: the part
    # planned for this machine is what is left of its budget
    base = engine.RUNNER_BASE_BYTES if runner else 0
    full = strategy.memory_budget_bytes
    import dataclasses

    from .quality import kv_type_for

    kv, kv_reason = kv_type_for(header, strategy)  # the tier's KV type, unless measured above max_kld
    if kv != strategy.kv_type:
        strategy = dataclasses.replace(strategy, kv_type=kv)
    if base:
        strategy = dataclasses.replace(strategy, memory_budget_bytes=max(0, full - base))
    try:
        plan, settings = offload_plan(header, n_ctx, strategy, check, embedding=embedding, projector=proj_header)
        name = model.path if model.source == "path" else model.name
        if plan.devices and not (plan.local_fits and plan.gpu_fits):
            raise DoesNotFit(f"{name} does not fit these machines together: {plan.refusal()}",
                             hint="add an RPC server or memory (host:port=SIZE), or a smaller quantization or --ctx")
    except DoesNotFit as exc:
        if base:  # the budget it names is what the runner leaves: say so
            said = f"budget {format_bytes(strategy.memory_budget_bytes)}"
            exc.message = exc.message.replace(said, f"{said} ({format_bytes(full)} less {format_bytes(base)} "
                                                    "for its runner process)")
            exc.args = (exc.message,)
        raise
    if contexts is None:
        contexts = encoder_contexts(plan, threads) if embedding else 1
    extra_ram, extra_vram = pool_extra_bytes(plan, contexts)
    endpoints = tuple(dict.fromkeys(e for e in plan.endpoints if e)) if plan.n_gpu_layers else ()
    spec = engine.LoadSpec(Path(model.path), n_ctx, threads, plan.n_gpu_layers,
                           projector, embedding=embedding, settings=settings, parallel=parallel,
                           tensor_split=plan.tensor_split, contexts=contexts, rpc_servers=endpoints)
    if os.environ.get("ORION_DRY_RUN", "1") != "0":  # llama.cpp's own figures for this load's buffers
        plan = exact_plan(plan, spec, header, projector=proj_header)
        extra_ram, extra_vram = pool_extra_bytes(plan, contexts)
    hint = ""
    ctx = n_ctx
    while ctx > 256:
        ctx //= 2
        smaller = estimate_memory(header, ctx, settings, projector=proj_header,
                                  n_gpu_layers=plan.n_gpu_layers).total_bytes
        if smaller <= strategy.memory_budget_bytes:
            hint = f"--ctx {ctx} fits ({format_bytes(smaller)})"
            break
    if not hint:
        hint = "a smaller quantization or model ('orion fetch NAME --quant q4')"
    else:
        hint += ", or a smaller quantization ('orion fetch NAME --quant q4')"

    def load(cancel):
        if runner:
            return engine.start_runner(spec, check=check, cancel=cancel, progress=progress, name=model.name)
        return engine.load(spec, check=check, cancel=cancel, progress=progress)

    # the ledger's key: the dry run's (file and settings) and what it leaves out, the pool and the projector
    ledger_key = engine.dry_run_key(spec, engine.header_digest(spec.path, header.data_offset)) + (
        f"-c{contexts}" + ("-p" if projector else ""))
    fill = plan.cpu.fill_bytes * max(1, contexts)
    if plan.devices:  # split over RPC servers (and this machine's GPUs after them)
        local_gpus = tuple(g.total_bytes for e, g in zip(plan.endpoints, plan.gpus) if not e)
        return Request(spec.key, model.name, plan.cpu.total_bytes + base, load, hint, gpu_bytes=plan.local_gpu_bytes,
                       placement="; ".join(x for x in (plan.describe(), kv_reason) if x), remote=plan.remote_parts if endpoints else (),
                       fill_bytes=fill, ledger_key=ledger_key, gpu_parts=local_gpus, base_bytes=base,
                       figures=plan.cpu.source)
    gpu_parts = tuple(g.total_bytes + (extra_vram if i == 0 else 0) for i, g in enumerate(plan.gpus))
    return Request(spec.key, model.name, plan.cpu.total_bytes + extra_ram + base, load, hint,
                   gpu_bytes=plan.gpu_bytes + extra_vram,
                   placement="; ".join(x for x in (plan.describe() if plan.n_gpu_layers else
                                                   "all layers on the CPU" if kv_reason else "", kv_reason) if x),
                   fill_bytes=fill, ledger_key=ledger_key, gpu_parts=gpu_parts if plan.n_gpu_layers else (),
                   base_bytes=base, figures=plan.cpu.source)


def manager_for(strategy: Strategy, *, on_event=None, timer: bool = False, runners: bool = False) -> ModelManager:
    """The manager a strategy sizes, measuring each load (``runners``: its models load in runner
    processes) and recording it in ``$ORION_HOME/memory-ledger.json``."""
    from . import engine
    from .device import memory_now
    from .ledger import MemoryLedger
    from .measure import LoadProbe

    def available() -> int:
        return memory_now().available_bytes

    budgets = gpu_budgets_now(strategy)
    return ModelManager(max_models=strategy.max_models, budget_bytes=strategy.memory_budget_bytes,
                        keep_alive_s=strategy.keep_alive_s, available_memory=available, on_event=on_event,
                        timer=timer, gpu_budget_bytes=sum(budgets) if budgets else None, gpu_budgets=budgets,
                        probe=LoadProbe(in_process=not runners, prepare=engine.load_library),
                        memory_ledger=MemoryLedger())


def encoder_model(text: str | None, strategy: Strategy, *, prefer_id: str | None = None
                  ) -> tuple[LocalModel, str, int]:
    """The GGUF of an encoder (converting a safetensors model on first use), its id and window.

    ``text``: a model name (default ``minilm``), a Hub repo, a Hugging Face folder or a GGUF,
    optionally with the type to convert to (``minilm@q8_0``). A converted model lives in
    ``$ORION_HOME/models`` and is reused; its type is the one asked for, else the one in
    ``prefer_id`` (the id a collection was made with, ``MODEL@TYPE``) when that names the same
    model, else this machine's (:func:`orion_cli.embeddings.choose_encoder_type`).
    """
    import hashlib

    from .convert import MAX_SEQ_KEY, TARGETS, convert_bert_apart
    from .models import catalog
    from .paths import orion_home

    text = text or "minilm"
    # a name registered here or in the catalog is that model, whatever the current folder holds
    # (as models.resolve decides): './minilm' does not shadow minilm (in the server, its folder)
    names = set(Registry().all()) | set(catalog())
    user_path(text)  # ~user, a user this machine does not have: NotFound
    base, at, suffix = text.rpartition("@")
    asked = None
    if (text not in names and at and base and suffix.lower() in TARGETS
            and (base in names or not on_disk(user_path(text)))):
        text, asked = base, suffix.lower()
    path = user_path(text)
    by_name = text in names
    folder: Path | None = None
    model_id = text
    if not by_name and on_disk(path) and path.is_dir():
        folder = path
        model_id = path.resolve().name
    elif not by_name and (path.suffix == ".gguf" or on_disk(path)):
        _no_type_for_a_gguf(text, asked)
        local = local_model(text, strategy)
        header = read_local_header(Path(local.path))
        check_model_kind(text, header, embedding=True)
        return local, path.name, int(header.get(MAX_SEQ_KEY) or min(512, header.context_length or 512))
    else:
        ref = resolve(text)
        if ref.local is not None and ref.local.path.endswith(".gguf"):
            _no_type_for_a_gguf(text, asked)
            header = read_local_header(Path(ref.local.path))
            check_model_kind(text, header, embedding=True)
            return ref.local, ref.local.repo or ref.name, int(header.get(MAX_SEQ_KEY) or 512)
        if ref.local is not None:
            folder = Path(ref.local.path)
            model_id = ref.local.repo or ref.name
        elif ref.repo:
            from .snapshots import fetch_snapshot

            if ref.format != "safetensors":
                raise WrongModelKind(f"{text} is not an encoder", hint="use minilm, a BERT repo, folder or GGUF")
            folder = Path(fetch_snapshot(ref).path)
            model_id = ref.repo
    if folder is None:
        raise NotFound(f"{text} names no encoder", hint="use minilm, a BERT repo, folder or GGUF")
    try:  # a folder that holds no encoder (/tmp, /, /proc, a registered folder since removed): not a bug
        weights = (folder / "model.safetensors").stat()
    except OSError as exc:
        what = "no model.safetensors" if isinstance(exc, (FileNotFoundError, NotADirectoryError)) else exc.strerror
        raise NotFound(f"{folder} holds no encoder ({what})",
                       hint="give a Hugging Face BERT folder (config.json, model.safetensors, vocab.txt), "
                            "a .gguf encoder or a name ('orion list')") from None
    target = asked or encoder_type(model_id, strategy, prefer_id)
    stamp = hashlib.sha1(f"{folder.resolve()}|{weights.st_mtime_ns}".encode()).hexdigest()
    out = orion_home() / "models" / f"{folder.resolve().name}-{stamp[:10]}-{target}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # in a child: this process loads the encoder next, and must do it as every later call does, with
        # none of the converter's libraries (numpy first of all) loaded before llama.cpp's (issue 23)
        convert_bert_apart(folder, out, target)
    header = read_local_header(out)
    local = LocalModel(name=model_id, kind="encoder", path=str(out), source="convert", file_type=target.upper(),
                       size_bytes=out.stat().st_size)
    return local, f"{model_id}@{target}", int(header.get(MAX_SEQ_KEY) or 512)


def _no_type_for_a_gguf(text: str, asked: str | None) -> None:
    if asked:
        raise InvalidValue(f"{text} is a GGUF file: its type is the file's own, not {asked}",
                           hint=f"drop '@{asked}', or give the Hugging Face folder to convert")


def encoder_type(model_id: str, strategy: Strategy, prefer_id: str | None = None) -> str:
    """The type to convert encoder ``model_id`` to: a collection's own (``prefer_id``), else this
    machine's choice (measured by ``orion profile --bench``, or from the engine check)."""
    from .convert import TARGETS
    from .device import cpu_has_bf16
    from .embeddings import choose_encoder_type
    from .engine import current_check

    prefix, _, target = (prefer_id or "").rpartition("@")
    if prefix == model_id and target in TARGETS:
        return target
    measured = (strategy.bench or {}).get("encoder", {}).get("measured")
    check = current_check()
    on_gpu = bool(check.gpu_offload and strategy.n_gpu_layers != 0 and gpu_budgets_now(strategy))
    return choose_encoder_type(check.amx, measured, gpu=on_gpu, bf16=cpu_has_bf16()).name
