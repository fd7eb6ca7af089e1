"""A model loaded in llama.cpp: :class:`LoadedModel` (generation, tokens, perplexity, an encoder's pool)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .. import messages
from ..gguf_header import GGUFHeader
from ..messages import chat_messages
from ._binding import decode_alone, raw_context, return_freed_memory
from .decoder import LLAMA_CPP_TOO_LONG, ParallelDecoder, cut_at_stops, prompt_too_long
from .encoder_pool import EncoderPool
from .prompts import prompt_tokens
from .sampling import Sampling, llama_cpp_sampling_kwargs
from .spec import LoadSpec, Timings

TOKENIZE_THREADS_MAX = 8  # threads a long list of texts is tokenised on
TOKENIZE_SHARE_MIN = 64  # texts a thread gets at least


class LoadedModel:
    """One model loaded in llama.cpp."""

    def __init__(self, spec: LoadSpec, header: GGUFHeader, llm, chat_handler, load_s: float) -> None:
        self.spec = spec
        self.header = header
        self._llm = llm
        self._chat_handler = chat_handler
        self.load_s = load_s
        self._encoder = EncoderPool(llm, spec) if spec.embedding else None
        self.has_chat_template = bool(header.get("tokenizer.chat_template"))
        self._decoder: ParallelDecoder | None = None
        self._decoder_lock = threading.Lock()

    @property
    def n_contexts(self) -> int:
        """An encoder's contexts decoding side by side (1 for an LLM)."""
        return self._encoder.n_contexts if self._encoder is not None else 1

    def embed_tokens(self, sequences: Sequence[Sequence[int]]):
        """Pooled embeddings of token-id lists (float32, one row each, not normalised): an encoder's."""
        if self._encoder is None:
            raise RuntimeError("the model is not loaded as an encoder")
        return self._encoder.embed_tokens(sequences)

    def decoder(self) -> "ParallelDecoder":
        """The decoder that runs this model's text requests (together, when loaded with parallel > 1)."""
        with self._decoder_lock:
            if self._decoder is None:
                self._decoder = ParallelDecoder(self)
            return self._decoder

    @property
    def decode_steps(self) -> int:
        """llama_decode calls of this model's decoder since it loaded (0 before its first text request)."""
        decoder = self._decoder
        return decoder.steps if decoder is not None else 0

    @property
    def is_vision(self) -> bool:
        return self._chat_handler is not None

    def chat_mode(self, prompt: str, system: str | None, history: Sequence[dict],
                  chat: bool | None) -> tuple[str, str | None, bool]:
        """(prompt, system, whether a chat format applies): :func:`orion_cli.messages.chat_mode`."""
        return messages.chat_mode(self.has_chat_template, self.is_vision, prompt, system, history, chat)

    def chat_format(self, system: str | None, history: Sequence[dict], chat: bool | None) -> str:
        """The name of the format a prompt is evaluated in (:func:`orion_cli.messages.chat_format`)."""
        return messages.chat_format(self.has_chat_template, self.is_vision, self.header.architecture,
                                    system, history, chat)

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
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        timings: Timings | None = None,
        history: Sequence[dict] = (),
        chat: bool | None = None,
        cache_prompt: bool = True,
        grammar: str | None = None,
    ) -> Iterator[str]:
        """Stream the model's continuation of ``prompt`` (its chat template when it has one;
        ``chat=False``: a plain completion of the text, as /v1/completions asks), cut at the
        template's stop strings. Text runs through the same decoder and sampler chain as the
        server's requests; a vision model through llama-cpp-python's chat handler (the images)."""
        if self.is_vision:
            yield from self._generate_vision(prompt, system, images, history, max_tokens,
                                             Sampling(temperature, top_p, seed, presence_penalty,
                                                      frequency_penalty, grammar=grammar), timings)
            return
        tokens, stops = prompt_tokens(self, prompt, system=system, history=history, chat=chat)
        pieces = self.decoder().generate(tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                         seed=seed, presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty, timings=timings,
                                         cache_prompt=cache_prompt, grammar=grammar)
        yield from cut_at_stops(pieces, stops)

    def _generate_vision(self, prompt: str, system: str | None, images: Sequence[Path], history: Sequence[dict],
                         max_tokens: int, sampling: Sampling, timings: Timings | None) -> Iterator[str]:
        t = timings if timings is not None else Timings()
        # Evaluate every prompt from position 0: llama-cpp-python would reuse the KV cache of a
        # matching prefix, which evaluates in other batch shapes and changes the low bits of the
        # logits, so the same prompt and seed would not give the same text twice.
        self._llm.reset()
        start = time.perf_counter()
        first = None
        stream = self._llm.create_chat_completion(messages=chat_messages(system, history, prompt, images), max_tokens=max_tokens, stream=True,
                                                  **llama_cpp_sampling_kwargs(sampling))
        n = 0
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content") or ""
                if first is None:
                    first = time.perf_counter()
                n += 1
                if piece:
                    yield piece
        except ValueError as exc:  # llama-cpp-python's check, before it evaluates anything
            found = LLAMA_CPP_TOO_LONG.match(str(exc))
            if not found:
                raise
            raise prompt_too_long(int(found[1]), int(found[2])) from exc
        end = time.perf_counter()
        t.prompt_tokens = max(0, self._llm.n_tokens - n)
        t.prompt_s = (first or end) - start
        t.gen_tokens = max(0, n - 1)
        t.gen_s = end - (first or end)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids as the model sees them (with BOS/[CLS] and, for encoders, [SEP])."""
        return self._llm.tokenize(text.encode(), add_bos=special, special=special)

    def tokenize_many(self, texts: Sequence[str], *, special: bool = True) -> list[list[int]]:
        """:meth:`tokenize` of each text (one call for many: a model in a runner answers it in one message).
        Many texts are shared out between threads: llama.cpp's tokenizer releases the GIL and keeps no
        state between calls (its server tokenises in every HTTP thread at once)."""
        def run(part: Sequence[str]) -> list[list[int]]:
            return [self._llm.tokenize(t.encode(), add_bos=special, special=special) for t in part]

        workers = min(TOKENIZE_THREADS_MAX, os.cpu_count() or 1, len(texts) // TOKENIZE_SHARE_MIN)
        if workers < 2:
            return run(texts)
        from concurrent.futures import ThreadPoolExecutor

        share = -(-len(texts) // workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="orion-tokenize") as pool:
            return [ids for part in pool.map(run, [texts[k: k + share] for k in range(0, len(texts), share)])
                    for ids in part]

    def prompt_tokens(self, prompt: str | None, *, system: str | None = None, history: Sequence[dict] = (),
                      chat: bool | None = None, tools: list[dict] | None = None) -> tuple[list[int], list[str]]:
        """The tokens a prompt is evaluated as, and the template's stop strings (:func:`.prompts.prompt_tokens`)."""
        return prompt_tokens(self, prompt, system=system, history=history, chat=chat, tools=tools)

    def grammar_for(self, response_format: dict | None) -> str | None:
        """The grammar of a response format (:func:`.grammar.grammar_for`), made where llama_cpp is."""
        from .grammar import grammar_for

        return grammar_for(response_format)

    def perplexity_window(self, tokens: Sequence[int], first_scored: int):
        """Negative log-likelihoods of ``tokens[j + 1]`` given ``tokens[: j + 1]`` for j from
        ``first_scored`` to the end, from one evaluation of the window (llama.cpp's perplexity)."""
        import numpy as np

        nll = []

        def score(j: int, logits) -> None:
            top = float(logits.max())
            log_z = top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
            nll.append(log_z - float(logits[tokens[j + 1]]))

        self.window_logits(tokens, first_scored, score)
        return nll

    def window_logits(self, tokens: Sequence[int], first_scored: int, each: Callable[[int, Any], None]) -> None:
        """One evaluation of the window ``tokens`` in an emptied context; ``each(j, logits)`` for j from
        ``first_scored`` to ``len(tokens) - 2``: the float32 logits (a numpy view, valid during the
        call only) after ``tokens[: j + 1]`` (llama.cpp's perplexity and KL divergence)."""
        import llama_cpp
        import numpy as np

        if self._decoder is not None:  # the window is evaluated in an emptied context
            self._decoder.forget_cache()
        ctx = raw_context(self._llm)
        n_vocab = self._llm.n_vocab()
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            decode_alone(ctx, batch, tokens, lambda pos: first_scored <= pos < len(tokens) - 1)
            for j in range(first_scored, len(tokens) - 1):
                each(j, np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j), shape=(n_vocab,)))
        finally:
            llama_cpp.llama_batch_free(batch)
            self._llm.reset()

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    @property
    def n_embd(self) -> int:
        return self._llm.n_embd()

    def close(self) -> None:
        if self._encoder is not None:  # its embeddings stop after their current decode; its contexts go
            self._encoder.close()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._chat_handler is not None and hasattr(self._chat_handler, "close"):
            try:
                self._chat_handler.close()
            except Exception:  # the handler's own cleanup; the model closes regardless
                pass
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            return_freed_memory()
            if self.spec.rpc_servers:
                from . import ggml_rpc

                ggml_rpc.untrack(self.spec.rpc_servers)
