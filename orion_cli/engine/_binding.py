"""Where orion reaches past llama-cpp-python's public API, all in one place (each reach-in is checked
by tests/test_engine.py against the pinned version, so an upgrade that breaks one fails loudly):

- ``llama_model_default_params`` / ``llama_context_default_params`` patched during a load, to set
  fields that ``Llama()`` does not take (``use_extra_bufts``, a progress callback, a device list,
  ``n_seq_max``, ``kv_unified``);
- ``Llama._ctx.ctx`` and ``Llama._model.model``: the raw pointers the decoder, the encoder pool and
  perplexity decode on (:func:`raw_context`, :func:`raw_model`);
- ``Llama._model.token_get_text`` (a template's BOS/EOS text), ``Llava15ChatHandler._init_mtmd_context``
  (a projector loaded at once), llama-cpp-python's log printer;
- a ``llama_batch`` backed by numpy arrays, and glibc's ``malloc_trim`` after a close;
- the dry run (:mod:`.dryrun`): ``llama_model_params.no_alloc`` and ``load_mode``, and llama.cpp's log lines
  of its buffer sizes (``sched_reserve: ... compute buffer size``, ``llama_kv_cache: size``, ``output buffer
  size``), checked against real loads by tests/test_estimate_matrix.py (an unparsed log fails them).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

PARAMS_LOCK = threading.Lock()


def load_library() -> None:
    """Import llama-cpp-python now (libllama, ggml's backends, numpy): a memory measure across a load
    taken after this sees the model alone, not the library's first import."""
    import llama_cpp  # noqa: F401


@contextmanager
def model_params(progress: Callable[[float], bool] | None = None, **fields) -> Iterator[None]:
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

    with PARAMS_LOCK:
        C.llama_model_default_params = patched
        try:
            yield
        finally:
            C.llama_model_default_params = original


@contextmanager
def context_params(**fields) -> Iterator[None]:
    """Set llama_context_params fields that Llama() does not take (n_seq_max, kv_unified); under
    the same lock as :func:`model_params`, which the caller holds."""
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


def raw_context(llm):
    """The ``llama_context *`` of a ``Llama`` (llama-cpp-python 0.3.x: ``Llama._ctx.ctx``)."""
    return llm._ctx.ctx


def raw_model(llm):
    """The ``llama_model *`` of a ``Llama`` (llama-cpp-python 0.3.x: ``Llama._model.model``)."""
    return llm._model.model


def token_text(llm, token: int) -> str:
    """The text of one token (llama-cpp-python 0.3.x: ``Llama._model.token_get_text``)."""
    return llm._model.token_get_text(token)


def init_projector(chat_handler, llm) -> None:
    """Load a vision projector now rather than at the first image (llama-cpp-python 0.3.x:
    ``Llava15ChatHandler._init_mtmd_context``), so one that does not fit the model fails at load."""
    chat_handler._init_mtmd_context(llm)


def llama_cpp_log_printer():
    """llama-cpp-python's own log printer, for --debug (0.3.x: ``llama_cpp._logger.llama_log_callback``)."""
    from llama_cpp._logger import llama_log_callback

    return llama_log_callback


def decode_alone(ctx, batch, tokens: Sequence[int], output: Callable[[int], bool]) -> None:
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


class TokenBatch:
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


def return_freed_memory() -> None:
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
