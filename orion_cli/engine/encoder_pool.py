"""An encoder's contexts on one model, decoding side by side (one a thread on a CPU, one a stream on a GPU)."""

from __future__ import annotations

import queue
import threading
from typing import Sequence

from ._binding import TokenBatch, raw_context, raw_model
from .spec import LoadSpec


class EncoderPool:
    def __init__(self, llm, spec: LoadSpec) -> None:
        """The encoder's contexts: llama-cpp-python's own, and ``n - 1`` more on the same model
        (the weights are shared; each context has its own compute buffer and, on a GPU, its own
        stream), each with a batch of its own. ``llama_decode`` releases the GIL, so threads
        decode on them side by side."""
        import llama_cpp

        self._llm, self.spec = llm, spec
        n = max(1, spec.contexts)
        self._extra_contexts: list = []
        # embeddings in progress (any thread): close() stops them and waits before freeing the contexts
        self._embeds = 0
        self._embeds_done = threading.Condition()
        self._closing = threading.Event()
        capacity = self.spec.settings.encoder_tokens(self.spec.n_ctx)
        threads = max(1, self.spec.threads // n) if n > 1 else self.spec.threads
        self._pool = queue.Queue()
        contexts = [raw_context(self._llm)]
        params = self._llm.context_params
        params.n_threads = params.n_threads_batch = threads
        for _ in range(n - 1):
            ctx = llama_cpp.llama_init_from_model(raw_model(self._llm), params)
            if not ctx:
                break  # out of memory for another: the pool is what fitted
            self._extra_contexts.append(ctx)
            contexts.append(ctx)
        for ctx in contexts:
            llama_cpp.llama_set_n_threads(ctx, threads, threads)
            self._pool.put((ctx, TokenBatch(capacity)))
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
        """Stop the embeddings in progress (after their current decode), wait for them, free the extra
        contexts (the first is the model's own, freed with it)."""
        self._closing.set()
        with self._embeds_done:
            self._embeds_done.wait_for(lambda: self._embeds == 0)
        if self._extra_contexts:
            import llama_cpp

            for ctx in self._extra_contexts:
                llama_cpp.llama_free(ctx)
            self._extra_contexts = []
