"""The engine adapter: the only module of orion that imports ``llama_cpp``.

A small typed surface over llama-cpp-python: :func:`load` (after the GGUF
header has been validated, so llama.cpp never sees a malformed file),
:meth:`LoadedModel.generate` (streaming), :meth:`LoadedModel.embed` and
:meth:`LoadedModel.close`. Native logs stay silent unless ``--debug``.

It also owns the engine health check (:func:`check_engine`): on Intel Xeons
with AMX inside a VM, llama.cpp's extra buffer types (weight repacking, the
AMX path among them) kill the process with SIGSEGV at the first decode of a
quantized model (llama.cpp issue #20824, PR #26954; ollama #17249). A canary
child process loads a tiny random-weight Q4_0 model and decodes a few tokens
with the default settings; if it dies by a signal, a second child tries the
safe settings (``use_extra_bufts = False``). The verdict is cached per engine
build and CPU, and every load uses it.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import NotAGGUF, OrionError
from .estimate import EngineSettings
from .gguf_header import GGUFHeader, read_local_header

CANARY_TOKENS = 32


class LoadCancelled(OrionError):
    exit_code = 130


def debug_enabled() -> bool:
    return os.environ.get("ORION_DEBUG") == "1"


from .enginecheck import (  # noqa: E402,F401  (the health check, re-exported)
    EngineCheck,
    EngineCrashed,
    canary_command,
    check_engine,
    current_check,
    engine_key,
)


def _canary_child(model: str, mode: str) -> None:
    """In the canary child: load with the given settings, decode, print tok/s as JSON."""
    if not Path(model).exists():
        from .tinymodel import write_tiny_llama

        write_tiny_llama(Path(model))
    with _model_params(use_extra_bufts=(mode != "safe")):
        from llama_cpp import Llama

        llm = Llama(model, n_ctx=256, n_threads=min(4, os.cpu_count() or 1), verbose=False, seed=0)
    start = time.perf_counter()
    out = llm("the", max_tokens=CANARY_TOKENS, temperature=0.0)
    n = max(1, out["usage"]["completion_tokens"])
    print(json.dumps({"tok_s": n / (time.perf_counter() - start), "features": build_features()}))


def build_features() -> list[str]:
    """What llama.cpp's CPU backend was built with and found here ("AVX2", "AMX_INT8", "OPENMP"...)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = [name.strip() for part in info.split("|") if "=" in part
                for name, value in [part.rsplit("=", 1)] if value.strip() == "1"
                for name in [name.split(":")[-1]]]
    if llama_cpp.llama_supports_gpu_offload():  # a CUDA (or other GPU) backend is built in
        features.append("GPU_OFFLOAD")
    if llama_cpp.llama_supports_rpc():  # the RPC backend (orion rpc-server, --rpc)
        features.append("RPC")
    return features


# ---------------------------------------------------------------- loading

_PARAMS_LOCK = threading.Lock()


@contextmanager
def _model_params(progress: Callable[[float], bool] | None = None, **fields) -> Iterator[None]:
    """Set llama_model_params fields that llama-cpp-python's Llama() does not expose.

    Llama() starts from llama_model_default_params(); during the call that
    function returns params with ``fields`` set. Loads are serialised by a lock.
    """
    import llama_cpp.llama_cpp as C

    original = C.llama_model_default_params
    callback = None
    if progress is not None:
        callback = C.llama_progress_callback(lambda value, _user: bool(progress(float(value))))

    def patched():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        if callback is not None:
            params.progress_callback = callback
        return params

    with _PARAMS_LOCK:
        C.llama_model_default_params = patched
        try:
            yield
        finally:
            C.llama_model_default_params = original


def settings_for(check: EngineCheck, *, embedding: bool = False, offload: bool = False) -> EngineSettings:
    """The llama.cpp settings orion loads with (and estimates for) under an engine verdict.

    Encoders run with flash attention on the CPU (measured faster for all-MiniLM-L6-v2), but not on a
    GPU: CUDA's kernels have no head size 32 (MiniLM's), so the op falls back to the CPU between
    GPU layers (measured on an H200: 74 chunks/s with it, 519 without). An encoder on a GPU packs
    ENCODER_GPU_PACK sequences into each decode (fewer launches a chunk; on a CPU one sequence a
    decode is fastest). An LLM offloaded to a GPU runs with flash attention (llama.cpp's own choice
    there: no attention-score matrix in VRAM)."""
    return EngineSettings(repack=check.use_extra_bufts, amx=check.amx, flash_attn=embedding != offload,
                          embed_pack=ENCODER_GPU_PACK if embedding and offload else 1)


# Sequences an encoder on a GPU decodes together. Measured on an H200 (all-MiniLM-L6-v2 F16, 4,000
# chunks of 700 characters, 8 contexts): 1 → 2,031 chunks/s, 2 → 2,472, 4 → 1,167, 8 → 824 (the
# non-causal mask spans the whole micro-batch: its cost grows with the square of the packed length).
ENCODER_GPU_PACK = 2


def machine_check() -> EngineCheck | None:
    """The engine check's cached verdict for this machine (None before any check has run)."""
    from .device import _cpu_info
    from .enginecheck import cached_check

    model, flags, _ = _cpu_info(Path("/proc/cpuinfo"))
    return cached_check(engine_key(model, flags))


def machine_settings(*, embedding: bool = False) -> EngineSettings:
    """The settings loads use on this machine, for estimates made without loading (list, inspect,
    fetch, eval): from the engine check's cached verdict; llama.cpp's defaults before any check
    has run (``orion profile`` runs it). Never runs the canary itself."""
    check = machine_check()
    return settings_for(check, embedding=embedding) if check else EngineSettings(flash_attn=embedding)


def peer_llama(path: Path | str, *, check: EngineCheck | None = None, **kwargs):
    """llama-cpp-python's own ``Llama``, loaded with the engine check's settings.

    For peers in benchmarks and independent checks in tests: where llama.cpp's
    defaults crash (GCC-built AMX kernels on Intel Xeons), a plain ``Llama()``
    would crash too, so nothing loads a model outside these settings.
    """
    check = check or current_check()
    with _model_params(use_extra_bufts=check.use_extra_bufts):
        from llama_cpp import Llama

        return Llama(str(path), **kwargs)


@contextmanager
def _context_params(**fields) -> Iterator[None]:
    """Set llama_context_params fields that Llama() does not take (n_seq_max, kv_unified); under
    the same lock as :func:`_model_params`, which the caller holds."""
    import llama_cpp.llama_cpp as C

    original = C.llama_context_default_params

    def patched():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    C.llama_context_default_params = patched
    try:
        yield
    finally:
        C.llama_context_default_params = original


@dataclass(frozen=True)
class LoadSpec:
    """What to load and how; the key of a model in the manager."""

    path: Path
    n_ctx: int
    threads: int
    n_gpu_layers: int = 0
    projector: Path | None = None
    embedding: bool = False
    settings: EngineSettings = field(default_factory=EngineSettings)
    whole_window: bool = False  # batch = context: evaluate a whole window at once (perplexity)
    parallel: int = 1  # sequences decoded together (orion serve): llama.cpp's n_seq_max, one unified KV cache
    tensor_split: tuple[float, ...] = ()  # the share of offloaded layers of each GPU (several GPUs)
    contexts: int = 1  # an encoder's contexts on the one model, decoding side by side (one a thread on a CPU)
    rpc_servers: tuple[str, ...] = ()  # host:port of RPC servers whose devices take layers (before local GPUs)

    @property
    def key(self) -> str:
        return (f"{self.path}|ctx={self.n_ctx}|emb={self.embedding}" + (f"|seq={self.parallel}" if self.parallel > 1 else "")
                + (f"|gpu={self.n_gpu_layers}" if self.n_gpu_layers else "")
                + (f"|rpc={','.join(self.rpc_servers)}" if self.rpc_servers else ""))


@dataclass(frozen=True)
class Chunk:
    text: str
    done: bool = False


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tok_s(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s else 0.0

    def to_dict(self) -> dict:
        return {"load_s": round(self.load_s, 3), "prompt_tokens": self.prompt_tokens,
                "prompt_tok_s": round(self.prompt_tok_s, 1), "generated_tokens": self.gen_tokens,
                "generation_tok_s": round(self.gen_tok_s, 1)}


def _decode_alone(ctx, batch, tokens: Sequence[int], output: Callable[[int], bool]) -> None:
    """Decode ``tokens`` as the only sequence in an emptied context; ``output(pos)`` says which
    positions return logits or embeddings."""
    import llama_cpp

    for pos, tok in enumerate(tokens):
        batch.token[pos] = tok
        batch.pos[pos] = pos
        batch.n_seq_id[pos] = 1
        batch.seq_id[pos][0] = 0
        batch.logits[pos] = output(pos)
    batch.n_tokens = len(tokens)
    memory = llama_cpp.llama_get_memory(ctx)
    if memory:
        llama_cpp.llama_memory_clear(memory, True)
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


class _TokenBatch:
    """A ``llama_batch`` whose arrays are numpy's: filled by array copies, one sequence id a token."""

    def __init__(self, capacity: int) -> None:
        import ctypes

        import llama_cpp
        import numpy as np

        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.ones(capacity, np.int8)
        seq_p = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_p * capacity)(*[ctypes.cast(base + 4 * i, seq_p) for i in range(capacity)])
        b = llama_cpp.llama_batch()
        b.token = self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_p))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.batch = b

    def fill(self, sequences: Sequence[Sequence[int]]) -> None:
        """Sequence k of ``sequences`` as seq_id k, positions from 0, every token an output."""
        import numpy as np

        n = 0
        for k, tokens in enumerate(sequences):
            m = len(tokens)
            self.token[n: n + m] = tokens
            self.pos[n: n + m] = np.arange(m, dtype=np.int32)
            self.seq[n: n + m] = k
            n += m
        self.batch.n_tokens = n


class LoadedModel:
    """One model loaded in llama.cpp."""

    def __init__(self, spec: LoadSpec, header: GGUFHeader, llm, chat_handler, load_s: float) -> None:
        self.spec = spec
        self.header = header
        self._llm = llm
        self._chat_handler = chat_handler
        self.load_s = load_s
        self._pool: queue.Queue | None = None  # (context, batch) pairs of an encoder
        self._extra_contexts: list = []
        # embeddings in progress (any thread): close() stops them and waits before freeing the contexts
        self._embeds = 0
        self._embeds_done = threading.Condition()
        self._closing = threading.Event()
        self.n_contexts = 1
        if spec.embedding:
            self._open_pool(max(1, spec.contexts))
        self.has_chat_template = bool(header.get("tokenizer.chat_template"))
        self._decoder: ParallelDecoder | None = None
        self._decoder_lock = threading.Lock()

    def decoder(self) -> "ParallelDecoder":
        """The decoder that runs this model's requests together (a model loaded with parallel > 1)."""
        with self._decoder_lock:
            if self._decoder is None:
                self._decoder = ParallelDecoder(self)
            return self._decoder

    @property
    def is_vision(self) -> bool:
        return self._chat_handler is not None

    def chat_mode(self, prompt: str, system: str | None, history: Sequence[dict],
                  chat: bool | None) -> tuple[str, str | None, bool]:
        """(prompt, system, whether the chat template applies): a model without a template gets
        the system text ahead of the prompt; ``chat`` forces the choice (False: a plain completion)."""
        if system and not self.has_chat_template and not self.is_vision and not chat:
            prompt, system = f"{system}\n\n{prompt}", None  # no template to put it in: it leads the text
        use_chat = self.has_chat_template or self.is_vision or system is not None or bool(history)
        return prompt, system, use_chat if chat is None else chat

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode(), add_bos=True, special=True))

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[Path] = (),
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int | None = None,
        timings: Timings | None = None,
        history: Sequence[dict] = (),
        chat: bool | None = None,
    ) -> Iterator[str]:
        """Stream the model's continuation of ``prompt`` (its chat template when it has one;
        ``chat=False``: a plain completion of the text, as /v1/completions asks)."""
        t = timings if timings is not None else Timings()
        # Evaluate every prompt from position 0: llama-cpp-python would reuse the KV cache of a
        # matching prefix, which evaluates in other batch shapes and changes the low bits of the
        # logits, so the same prompt and seed would not give the same text twice.
        self._llm.reset()
        prompt, system, use_chat = self.chat_mode(prompt, system, history, chat)
        start = time.perf_counter()
        first = None
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else []) + list(history)
            if images:
                content = [{"type": "text", "text": prompt}] + [
                    {"type": "image_url", "image_url": {"url": Path(p).absolute().as_uri()}} for p in images
                ]
                messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": "user", "content": prompt})
            stream = self._llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                      temperature=temperature, top_p=top_p, seed=seed, stream=True)
            pieces = (c["choices"][0]["delta"].get("content") or "" for c in stream)
        else:
            stream = self._llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                                 top_p=top_p, seed=seed, stream=True)
            pieces = (c["choices"][0]["text"] for c in stream)
        n = 0
        try:
            for piece in pieces:
                if first is None:
                    first = time.perf_counter()
                n += 1
                if piece:
                    yield piece
        except ValueError as exc:  # llama-cpp-python's check, before it evaluates anything
            found = _LLAMA_CPP_TOO_LONG.match(str(exc))
            if not found:
                raise
            raise prompt_too_long(int(found[1]), int(found[2])) from exc
        end = time.perf_counter()
        t.prompt_tokens = max(0, self._llm.n_tokens - n) if use_chat else self.count_tokens(prompt)
        t.prompt_s = (first or end) - start
        t.gen_tokens = max(0, n - 1)
        t.gen_s = end - (first or end)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids as the model sees them (with BOS/[CLS] and, for encoders, [SEP])."""
        return self._llm.tokenize(text.encode(), add_bos=special, special=special)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised, pooled embedding per text (the model's pooling: mean, CLS...)."""
        return self._llm.embed(list(texts), normalize=True)

    def perplexity_window(self, tokens: Sequence[int], first_scored: int):
        """Negative log-likelihoods of ``tokens[j + 1]`` given ``tokens[: j + 1]`` for j from
        ``first_scored`` to the end, from one evaluation of the window (llama.cpp's perplexity)."""
        import llama_cpp
        import numpy as np

        ctx = self._llm._ctx.ctx
        n_vocab = self._llm.n_vocab()
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            _decode_alone(ctx, batch, tokens, lambda pos: first_scored <= pos < len(tokens) - 1)
            nll = []
            for j in range(first_scored, len(tokens) - 1):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j), shape=(n_vocab,))
                top = float(logits.max())
                log_z = top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
                nll.append(log_z - float(logits[tokens[j + 1]]))
            return nll
        finally:
            llama_cpp.llama_batch_free(batch)
            self._llm.reset()

    @property
    def n_embd(self) -> int:
        return self._llm.n_embd()

    def _open_pool(self, n: int) -> None:
        """The encoder's contexts: llama-cpp-python's own, and ``n - 1`` more on the same model
        (the weights are shared; each context has its own compute buffer and, on a GPU, its own
        stream), each with a batch of its own. ``llama_decode`` releases the GIL, so threads
        decode on them side by side."""
        import llama_cpp

        capacity = self.spec.n_ctx * self.spec.settings.embed_pack
        threads = max(1, self.spec.threads // n) if n > 1 else self.spec.threads
        self._pool = queue.Queue()
        contexts = [self._llm._ctx.ctx]
        params = self._llm.context_params
        params.n_threads = params.n_threads_batch = threads
        for _ in range(n - 1):
            ctx = llama_cpp.llama_init_from_model(self._llm._model.model, params)
            if not ctx:
                break  # out of memory for another: the pool is what fitted
            self._extra_contexts.append(ctx)
            contexts.append(ctx)
        for ctx in contexts:
            llama_cpp.llama_set_n_threads(ctx, threads, threads)
            self._pool.put((ctx, _TokenBatch(capacity)))
        self.n_contexts = len(contexts)

    def embed_tokens(self, sequences: Sequence[Sequence[int]]):
        """Pooled embeddings (see :meth:`_embed_tokens`); an error once :meth:`close` has begun."""
        if self._closing.is_set():
            raise RuntimeError("the model is closed")
        out = self._embed_tokens(sequences)
        if self._closing.is_set():  # rows the closing stopped are not filled
            raise RuntimeError("the model was closed while embedding")
        return out

    def _embed_tokens(self, sequences: Sequence[Sequence[int]]):
        """Pooled embeddings (float32 matrix, one row per sequence, not normalised) of token-id lists.

        ``settings.embed_pack`` sequences per decode, whole, in one micro-batch. On a CPU one: measured
        on all-MiniLM-L6-v2 (F16, ~200-token chunks, 2 threads) this beat packing 2, 4 or 8 sequences
        per batch (17.6 / 16.7 / 13.4 chunks/s against 17.8); on a GPU two (ENCODER_GPU_PACK). The
        batch is filled from numpy arrays (no per-token Python). With several contexts (a pool), the
        sequences are shared out between threads, one context each.
        """
        import numpy as np

        longest = max((len(s) for s in sequences), default=0)
        if longest > self.spec.n_ctx:
            raise ValueError(f"a sequence of {longest} tokens exceeds n_ctx {self.spec.n_ctx}")
        out = np.empty((len(sequences), self._llm.n_embd()), dtype=np.float32)
        if len(sequences) < 2 or (self.n_contexts == 1 and self.spec.settings.embed_pack == 1):
            self._embed_rows(sequences, range(len(sequences)), out)
            return out
        # longest first (sequences packed together are alike in length), dealt round-robin:
        # every thread gets a like share of the work
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        if self.n_contexts == 1:
            self._embed_rows(sequences, order, out)
            return out
        shares = [order[k::self.n_contexts] for k in range(self.n_contexts)]
        errors: list[BaseException] = []

        def work(share: list[int]) -> None:
            try:
                self._embed_rows(sequences, share, out)
            except BaseException as exc:  # raised again in the caller's thread
                errors.append(exc)

        # Ctrl-C in the caller leaves these running: close() stops them (see _embed_rows)
        threads = [threading.Thread(target=work, args=(share,), daemon=True) for share in shares if share]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def _embed_rows(self, sequences: Sequence[Sequence[int]], rows, out) -> None:
        """Embed ``sequences[i]`` into ``out[i]`` for i in ``rows``, on a context of the pool (until
        :meth:`close` begins)."""
        import llama_cpp
        import numpy as np

        # counted while it decodes: close(), from any thread (Ctrl-C in the main thread while a worker
        # embeds), waits for it before freeing the contexts (that crashed the process with SIGSEGV)
        with self._embeds_done:
            if self._closing.is_set():
                return
            self._embeds += 1
        ctx, batch = self._pool.get()
        try:
            n_embd = out.shape[1]
            memory = llama_cpp.llama_get_memory(ctx)
            rows, pack = list(rows), self.spec.settings.embed_pack
            for start in range(0, len(rows), pack):
                if self._closing.is_set():
                    return
                part = rows[start: start + pack]
                batch.fill([sequences[i] for i in part])
                if memory:
                    llama_cpp.llama_memory_clear(memory, True)
                if llama_cpp.llama_decode(ctx, batch.batch) != 0:
                    raise RuntimeError("llama_decode failed")
                for seq, i in enumerate(part):
                    out[i] = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, seq), shape=(n_embd,))
        finally:
            self._pool.put((ctx, batch))
            with self._embeds_done:
                self._embeds -= 1
                self._embeds_done.notify_all()

    def close(self) -> None:
        self._closing.set()
        with self._embeds_done:  # each embedding stops after its current decode
            self._embeds_done.wait_for(lambda: self._embeds == 0)
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._chat_handler is not None and hasattr(self._chat_handler, "close"):
            try:
                self._chat_handler.close()
            except Exception:  # the handler's own cleanup; the model closes regardless
                pass
        if self._extra_contexts:
            import llama_cpp

            for ctx in self._extra_contexts:
                llama_cpp.llama_free(ctx)
            self._extra_contexts = []
        self._pool = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            _return_freed_memory()


# ---------------------------------------------------------------- several sequences at once


def prompt_tokens(model: "LoadedModel", prompt: str, *, system: str | None = None,
                  history: Sequence[dict] = (), chat: bool | None = None) -> tuple[list[int], list[str]]:
    """The tokens a prompt is evaluated as, and the template's stop strings: the model's chat
    template as llama-cpp-python's create_chat_completion builds it (the same rules as
    :meth:`LoadedModel.generate` for when it applies), else the plain text with BOS."""
    llm = model._llm
    prompt, system, use_chat = model.chat_mode(prompt, system, history, chat)
    if not use_chat or not model.has_chat_template:  # plain text (a vision model's system text leads it too)
        text = f"{system}\n\n{prompt}" if system else prompt
        return llm.tokenize(text.encode(), add_bos=True, special=True), []
    from llama_cpp import llama_chat_format

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id])
    messages = ([{"role": "system", "content": system}] if system else []) + list(history) + [
        {"role": "user", "content": prompt}]
    result = formatter(messages=messages)
    stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True), stops


@dataclass
class _Sequence:
    tokens: list[int]
    max_tokens: int
    sampler: object
    out: queue.Queue
    cancel: threading.Event
    seq_id: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    generated: int = 0
    next_token: int = -1
    logits_at: int = -1
    started: float = 0.0
    first_token_at: float = 0.0


# llama-cpp-python's words for a prompt longer than the context (Llama._create_completion, 0.3.x;
# tests/test_run.py fails if they change)
_LLAMA_CPP_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def prompt_too_long(n_tokens: int, n_ctx: int):
    """The error for a prompt that does not fit the context (nothing was evaluated)."""
    from .errors import InvalidValue

    return InvalidValue(f"the prompt is {n_tokens:,} tokens; the context holds {n_ctx:,}",
                        hint="give a shorter prompt, or a larger context (--ctx, ORION_CTX)")


class ParallelDecoder:
    """Decodes the sequences of every request on one model together: each step is one
    ``llama_decode`` with the next token of every running sequence, each sequence with its own
    sampler; a new request's prompt is evaluated in a step of its own. The model must be loaded with
    ``LoadSpec(parallel=N)``: N sequences share one unified KV cache of ``n_ctx`` cells, and a
    request waits until its prompt and ``max_tokens`` fit beside the others.

    :meth:`generate` yields text pieces like :meth:`LoadedModel.generate`; closing the iterator
    ends the sequence (its cells are freed at the next step)."""

    def __init__(self, model: "LoadedModel") -> None:
        import llama_cpp

        self.model = model
        self.n_seq = max(1, model.spec.parallel)
        self.n_ctx = model.spec.n_ctx
        self.capacity = max(model.spec.settings.n_ubatch, self.n_seq)
        self._ctx = model._llm._ctx.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(model._llm._model.model)
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._waiting: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="orion-decoder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ requests

    def generate(self, tokens: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int | None = None, timings: Timings | None = None) -> Iterator[str]:
        import codecs

        if not tokens:
            raise ValueError("an empty prompt")
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise prompt_too_long(len(tokens), self.n_ctx)
        seq = _Sequence(list(tokens), min(max_tokens, room), self._sampler(temperature, top_p, seed),
                        queue.Queue(), threading.Event(), started=time.perf_counter())
        with self._cond:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._waiting.append(seq)
            self._cond.notify_all()
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        t = timings if timings is not None else Timings()
        t.prompt_tokens = len(tokens)
        try:
            while True:
                item = seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    break
                text = decode.decode(item)
                if text:
                    yield text
            tail = decode.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            seq.cancel.set()
            end = time.perf_counter()
            first = seq.first_token_at or end
            t.prompt_s = first - seq.started
            t.gen_tokens = max(0, seq.generated - 1)
            t.gen_s = end - first

    def _sampler(self, temperature: float, top_p: float, seed: int | None):
        import random

        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            seed = random.getrandbits(32) if seed is None else seed & 0xFFFFFFFF
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    # ------------------------------------------------------------ the decode loop

    def _admit(self) -> None:
        """Waiting requests take free sequences while their prompt and max_tokens fit the cache."""
        free = [i for i in range(self.n_seq) if i not in self._running]
        reserved = sum(len(q.tokens) + q.max_tokens for q in self._running.values())
        while self._waiting and free:
            seq = self._waiting[0]
            if seq.cancel.is_set():  # its client went away while it waited
                import llama_cpp

                llama_cpp.llama_sampler_free(self._waiting.pop(0).sampler)
                continue
            if self._running and reserved + len(seq.tokens) + seq.max_tokens > self.n_ctx:
                break  # it waits for room
            self._waiting.pop(0)
            seq.seq_id = free.pop(0)
            self._forget(seq.seq_id)  # whatever another user of the context left there
            reserved += len(seq.tokens) + seq.max_tokens
            self._running[seq.seq_id] = seq

    def _forget(self, seq_id: int) -> None:
        import llama_cpp

        memory = llama_cpp.llama_get_memory(self._ctx)
        if memory:
            llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)

    def _finish(self, seq: _Sequence, error: BaseException | None = None) -> None:
        import llama_cpp

        self._forget(seq.seq_id)
        llama_cpp.llama_sampler_free(seq.sampler)
        self._running.pop(seq.seq_id, None)
        seq.out.put(error if error is not None else None)

    def _loop(self) -> None:
        import llama_cpp

        batch = self._batch
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    for seq in list(self._running.values()) + self._waiting:
                        seq.out.put(RuntimeError("the model was unloaded"))
                    return
                for seq in [q for q in self._running.values() if q.cancel.is_set()]:
                    self._finish(seq)
                self._admit()
                running = list(self._running.values())
            if not running:
                continue
            n = 0
            # A prompt is evaluated in a decode of its own, as it would be alone (batch shapes change
            # llama.cpp's arithmetic in the last bits); the next tokens of every generating sequence
            # share the other decodes.
            prefill = next((q for q in running if q.fed < len(q.tokens)), None)
            if prefill is not None:
                while prefill.fed < len(prefill.tokens) and n < self.capacity:
                    last = prefill.fed == len(prefill.tokens) - 1
                    n = self._add(batch, n, prefill.tokens[prefill.fed], prefill.fed, prefill, last)
                    prefill.fed += 1
                running = [prefill]
            else:
                for seq in running:
                    n = self._add(batch, n, seq.next_token, seq.fed + seq.generated - 1, seq, True)
            batch.n_tokens = n
            if llama_cpp.llama_decode(self._ctx, batch) != 0:
                with self._cond:
                    for seq in running:
                        self._finish(seq, RuntimeError("llama_decode failed"))
                continue
            self.steps += 1
            with self._cond:
                for seq in running:
                    if seq.logits_at < 0:
                        continue  # its prompt is not all in yet
                    token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.logits_at)
                    seq.logits_at = -1
                    seq.generated += 1
                    if seq.generated == 1:
                        seq.first_token_at = time.perf_counter()
                    if llama_cpp.llama_vocab_is_eog(self._vocab, token) or seq.cancel.is_set():
                        self._finish(seq)
                        continue
                    seq.out.put(self._piece(token))
                    if seq.generated >= seq.max_tokens:
                        self._finish(seq)
                    else:
                        seq.next_token = token

    @staticmethod
    def _add(batch, n: int, token: int, pos: int, seq: _Sequence, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq.seq_id
        batch.logits[n] = logits
        if logits:
            seq.logits_at = n
        return n + 1

    def _piece(self, token: int) -> bytes:
        import ctypes

        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def close(self) -> None:
        import llama_cpp

        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise).

    Measured on gemma3-270m: after close, RSS stays 60 MiB above where it was
    (llama.cpp's vocabulary tables are many small allocations); after
    malloc_trim it is back within 4 MiB.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


_NULL_LOG = None


def _silence_mtmd() -> None:
    """The vision library (mtmd) logs every image it encodes to stderr; quiet unless --debug."""
    import llama_cpp.mtmd_cpp as M

    _route_llama_log(False)
    M.mtmd_log_set(_NULL_LOG, None)
    M.mtmd_helper_log_set(_NULL_LOG, None)


def _route_llama_log(verbose: bool) -> None:
    """llama.cpp's log: llama-cpp-python's printer with --debug, else nothing. (0.3.36's printer maps
    ggml's levels one off: every warning reaches stderr even with verbose=False, and its errors
    never do; orion reports failures in its own words.)"""
    global _NULL_LOG
    import llama_cpp.llama_cpp as C

    if verbose:
        from llama_cpp._logger import llama_log_callback

        C.llama_log_set(llama_log_callback, None)
        return
    if _NULL_LOG is None:
        _NULL_LOG = C.llama_log_callback(lambda level, text, user_data: None)  # kept alive: C holds it
    C.llama_log_set(_NULL_LOG, None)


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
) -> LoadedModel:
    """Load a model (validated first) with the settings the engine check recorded."""
    header = validate(spec.path)
    if spec.projector is not None:
        validate(spec.projector)
    check = check or current_check()

    def on_progress(value: float) -> bool:
        if progress:
            progress(value)
        return not (cancel is not None and cancel.is_set())

    start = time.perf_counter()
    verbose = debug_enabled()
    _route_llama_log(verbose)
    s = spec.settings
    parallel = {"n_seq_max": spec.parallel, "kv_unified": True} if spec.parallel > 1 else {}
    if spec.embedding and s.embed_pack > 1:
        parallel = {"n_seq_max": s.embed_pack}
    devices = {}
    if spec.rpc_servers:  # the devices, in llama.cpp's order: the servers', then this machine's GPUs
        chosen = rpc_devices(spec.rpc_servers) + local_gpu_devices()
        array = (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)  # NULL-terminated; alive through the load
        devices = {"devices": ctypes.addressof(array)}
    with _model_params(progress=on_progress, use_extra_bufts=check.use_extra_bufts and s.repack, **devices), \
            _context_params(**parallel):
        from llama_cpp import Llama

        chat_handler = None
        if spec.projector is not None:
            from llama_cpp.llama_chat_format import Llava15ChatHandler

            if not verbose:
                _silence_mtmd()

            chat_handler = Llava15ChatHandler(clip_model_path=str(spec.projector), verbose=verbose)
        try:
            # an encoder or a scored window is evaluated whole, in one batch
            n_batch = max(s.n_ubatch, spec.n_ctx) if (spec.embedding or spec.whole_window) else s.n_ubatch
            n_ctx = spec.n_ctx
            if spec.embedding:  # embed_pack sequences a decode
                n_ctx = n_batch = spec.n_ctx * s.embed_pack
            llm = Llama(
                str(spec.path), n_ctx=n_ctx, n_threads=spec.threads, n_threads_batch=spec.threads,
                n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=spec.n_gpu_layers,
                tensor_split=list(spec.tensor_split) or None,
                swa_full=s.swa_full, flash_attn=s.flash_attn, embedding=spec.embedding,
                chat_handler=chat_handler, verbose=verbose,
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
                chat_handler._init_mtmd_context(llm)
            except ValueError as exc:
                llm.close()
                raise NotAGGUF(f"the projector {spec.projector} does not fit {spec.path.name}: {exc}",
                               hint="use the mmproj file published with this model; --debug shows why") from exc
    return LoadedModel(spec, header, llm, chat_handler, time.perf_counter() - start)


# ---------------------------------------------------------------- RPC: other machines' devices

_GGML = None
_DEV_CPU, _DEV_GPU = 0, 1  # enum ggml_backend_dev_type


def _ggml():
    """ggml's backend registry, in the very copy libllama uses: ``lib/libggml.so.0``, its soname.
    The wheel holds libggml.so, .so.0 and .so.0.25.3 as three copies of one file; opening another
    loads a second registry, and devices found there are silently ignored (measured: every layer
    stayed on the CPU)."""
    global _GGML
    if _GGML is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
        p, c = ctypes.c_void_p, ctypes.c_char_p
        for name, res, args in (("ggml_backend_reg_by_name", p, [c]), ("ggml_backend_reg_get_proc_address", p, [p, c]),
                                ("ggml_backend_reg_dev_count", ctypes.c_size_t, [p]),
                                ("ggml_backend_reg_dev_get", p, [p, ctypes.c_size_t]),
                                ("ggml_backend_dev_count", ctypes.c_size_t, []),
                                ("ggml_backend_dev_get", p, [ctypes.c_size_t]),
                                ("ggml_backend_dev_type", ctypes.c_int, [p]),
                                ("ggml_backend_dev_by_type", p, [ctypes.c_int]),
                                ("ggml_backend_dev_backend_reg", p, [p]),
                                ("ggml_backend_reg_name", c, [p]),
                                ("ggml_set_abort_callback", p, [p])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _GGML = lib
    return _GGML


def rpc_supported() -> bool:
    """Whether this llama.cpp was built with its RPC backend (-DGGML_RPC=ON)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def _rpc_proc(name: bytes, prototype):
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name) if reg else None
    if not address:
        from .rpc import rpc_unsupported

        raise rpc_unsupported()
    return prototype(address)


def rpc_devices(endpoints: Sequence[str]) -> list[int]:
    """The devices of RPC servers (``host:port``), as llama.cpp's ``--rpc`` finds them. Probe the
    servers first (:func:`orion_cli.rpc.probe`): llama.cpp aborts the process on one it cannot reach."""
    add = _rpc_proc(b"ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    lib = _ggml()
    _catch_rpc_aborts()
    _RPC_ENDPOINTS.update(endpoints)
    found = []
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        found += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg) if reg else 0)]
    return found


def local_gpu_devices() -> list[int]:
    """This machine's GPUs (not RPC servers' devices), in llama.cpp's order."""
    lib = _ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) == _DEV_GPU and \
                lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) != b"RPC":
            out.append(dev)
    return out


_ABORT_HANDLER = None
_RPC_ENDPOINTS: set[str] = set()
RPC_LOST_EXIT = 6  # errors.EXIT_NETWORK


def _unreachable(endpoints) -> list[str]:
    """The servers that no longer accept a connection (one still serving this process accepts it)."""
    import socket

    gone = []
    for endpoint in sorted(endpoints):
        host, _, port = endpoint.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except OSError:
            gone.append(endpoint)
    return gone


def _catch_rpc_aborts() -> None:
    """llama.cpp's RPC client aborts the process when a server stops answering mid-run
    (``RPC_STATUS_ASSERT``: SIGABRT, a core dump). ggml calls its abort callback first: there,
    orion says so in one line and ends the process with the network exit code. Any other abort
    keeps ggml's own report."""
    global _ABORT_HANDLER
    if _ABORT_HANDLER is not None:
        return

    def on_abort(message: bytes) -> None:
        text = (message or b"").decode(errors="replace").strip()
        if "rpc" not in text.lower():  # "ggml-rpc.cpp:354: Remote RPC server crashed or ..."
            sys.stderr.write(text + "\n")
            return
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - the process ends either way
            pass
        reason = text.split(": ", 1)[-1].strip()
        gone = _unreachable(_RPC_ENDPOINTS)
        which = f"the RPC server {', '.join(gone)}" if gone else "an RPC server"
        os.write(2, (f"\nerror: {which} stopped answering mid-run (llama.cpp: {reason}): check that "
                     f"'orion rpc-server' still runs there and is reachable, then run this again\n").encode())
        os._exit(RPC_LOST_EXIT)

    _ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(on_abort)
    _ggml().ggml_set_abort_callback(ctypes.cast(_ABORT_HANDLER, ctypes.c_void_p))


def rpc_server_command(host: str, port: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "orion_cli.engine", "rpc-server", host, str(port), str(threads)]


def _rpc_server_child(host: str, port: str, threads: str) -> None:
    """In the rpc-server child: llama.cpp's RPC server for this machine's GPUs, or its CPU where it
    has none, on host:port; blocks while it serves. Exit 3: it could not start (see its stderr)."""
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        sys.exit(4)
    llama_cpp.llama_backend_init()
    _route_llama_log(debug_enabled())
    start = _rpc_proc(b"ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)))
    devices = local_gpu_devices() or [_ggml().ggml_backend_dev_by_type(_DEV_CPU)]
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(f"{host}:{port}".encode(), None, int(threads), len(devices), array)
    sys.exit(3)


# ---------------------------------------------------------------- quantization

def quantize_command(src: Path, dst: Path, type_name: str, threads: int, allow_requantize: bool) -> list[str]:
    return [sys.executable, "-m", "orion_cli.engine", "quantize", str(src), str(dst), type_name, str(threads),
            "1" if allow_requantize else "0"]


def _quantize_child(src: str, dst: str, type_name: str, threads: str, allow: str) -> None:
    """In the quantize child: llama_model_quantize, exit status its return code."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    from .quant_types import FILE_TYPE_IDS

    params.ftype = FILE_TYPE_IDS[type_name]
    params.nthread = int(threads)
    params.allow_requantize = allow == "1"
    sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


if __name__ == "__main__":  # python -m orion_cli.engine canary MODEL default|safe | quantize ...
    if len(sys.argv) == 4 and sys.argv[1] == "canary":
        _canary_child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 7 and sys.argv[1] == "quantize":
        _quantize_child(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "rpc-server":
        _rpc_server_child(*sys.argv[2:])
    else:
        sys.exit("usage: python -m orion_cli.engine canary MODEL default|safe | quantize IN OUT TYPE THREADS 0|1"
                 " | rpc-server HOST PORT THREADS")

