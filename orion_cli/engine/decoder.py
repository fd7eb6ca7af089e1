"""Token generation: one decode loop for every request on a model, several sequences a step
(:class:`ParallelDecoder`), each with the one sampler chain of :mod:`.sampling`, and the prompt
cache; the prompt's tokens are :mod:`.prompts`'s.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ..errors import InvalidValue, OrionError
from ._binding import raw_context, raw_model
from .sampling import Sampling, sampler_chain, token_record
from .spec import Timings


def llama_cpp_free_sampler(sampler) -> None:
    import llama_cpp

    llama_cpp.llama_sampler_free(sampler)


@dataclass
class _Sequence:
    tokens: list[int]
    max_tokens: int
    sampler: object
    out: "queue.Queue"  # or any object with put(): each token's bytes, then None or an exception
    cancel: threading.Event
    seq_id: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    generated: int = 0
    next_token: int = -1
    logits_at: int = -1
    started: float = 0.0
    first_token_at: float = 0.0
    gone: threading.Event | None = None  # the caller's: its client went away
    eog: bool = False  # it ended on its own (an end-of-generation token)
    logprobs: int | None = None  # each token's log-probability, and this many of the likeliest beside it
    cache: bool = True  # its prompt may start from cells an earlier sequence left (the prompt cache)
    reused: int = 0  # prompt tokens found in the KV cache, not evaluated again
    out_tokens: list[int] = field(default_factory=list)  # the tokens sampled

    def in_cache(self) -> list[int]:
        """The tokens whose cells it holds now: the prompt as far as it was fed, then each sampled
        token but the last (a token is fed at the step after it was drawn)."""
        if self.fed < len(self.tokens):
            return self.tokens[: self.fed]
        return self.tokens + self.out_tokens[: max(0, self.generated - 1)]

    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.gone is not None and self.gone.is_set())

    def fill(self, t: "Timings") -> None:
        """Its timings, as of now (once it has ended: the whole of it)."""
        t.prompt_tokens = len(self.tokens)
        t.cached_tokens = self.reused
        t.hit_limit = not self.eog and self.generated >= self.max_tokens
        end = time.perf_counter()
        first = self.first_token_at or end
        t.prompt_s = first - self.started
        t.gen_tokens = max(0, self.generated - 1)
        t.gen_s = end - first


# llama-cpp-python's words for a prompt longer than the context (Llama._create_completion, 0.3.x;
# tests/test_run.py fails if they change)
class ModelUnloaded(OrionError):
    """The model was unloaded while a request was on it (the server is stopping, or it was evicted)."""


LLAMA_CPP_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def prompt_too_long(n_tokens: int, n_ctx: int):
    """The error for a prompt that does not fit the context (nothing was evaluated)."""
    return InvalidValue(f"the prompt is {n_tokens:,} tokens; the context holds {n_ctx:,}",
                        hint="give a shorter prompt, or a larger context (--ctx, ORION_CTX)")


# The shortest match the prompt cache reuses: fewer tokens save less than a step costs, and a prompt
# sharing only a BOS and a word with the last keeps a fresh evaluation's arithmetic.
MIN_REUSE = 32


class ParallelDecoder:
    """Decodes the sequences of every request on one model together: each step is one
    ``llama_decode`` with the next token of every running sequence, each sequence with its own
    sampler; a new request's prompt is evaluated in a step of its own. The model must be loaded with
    ``LoadSpec(parallel=N)``: N sequences share one unified KV cache of ``n_ctx`` cells, and a
    request waits until its prompt and ``max_tokens`` fit beside the others.

    :meth:`generate` yields text pieces like :meth:`LoadedModel.generate`; closing the iterator
    ends the sequence at the next step.

    **The prompt cache**: a finished sequence's cells stay in the KV cache, with the tokens they
    hold, until their room is needed or other sequences decode; a new prompt that starts with those tokens (a chat's next turn
    resends the whole conversation) takes that sequence and evaluates only the rest, as llama.cpp's
    server does with ``cache_prompt``. The reused cells were computed in other batches than a fresh
    prompt's would be, so the logits may differ in their last bits: ``cache_prompt=False`` evaluates
    the prompt from its first token in a context emptied of kept cells (other sequences' cells in the
    unified cache change the attention's summation order too), for runs that must be exact. A model with a sliding window
    reuses cells only where the window still holds what the rest of the prompt attends to."""

    def __init__(self, model: "LoadedModel") -> None:
        import llama_cpp

        self.model = model
        self.n_seq = max(1, model.spec.parallel)
        self.n_ctx = model.spec.n_ctx
        self.capacity = max(model.spec.settings.n_ubatch, self.n_seq)
        self._ctx = raw_context(model._llm)
        self._vocab = llama_cpp.llama_model_get_vocab(raw_model(model._llm))
        self._batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self._waiting: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}
        self._cached: dict[int, list[int]] = {}  # a free sequence id -> the tokens its cells still hold
        self._cached_at: dict[int, int] = {}  # -> when (a count of finished sequences): the oldest goes first
        self._finished = 0
        self._n_swa = llama_cpp.llama_model_n_swa(raw_model(model._llm))
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="orion-decoder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ requests

    def generate(self, tokens: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logprobs: int | None = None, records: list | None = None,
                 timings: Timings | None = None, cancel: threading.Event | None = None,
                 cache_prompt: bool = True, grammar: str | None = None,
                 grammar_triggers: Sequence[str] = ()) -> Iterator[str]:
        """Stream the text of one sequence. ``cancel`` (the caller's: its client went away) ends it at
        the next step, whether it runs or still waits for a free sequence. With ``logprobs`` (a count),
        each token's :func:`.sampling.token_record` is appended to ``records`` before the text that holds it is
        yielded. ``cache_prompt``: see the class's docstring. ``grammar``: GBNF the text follows
        (:mod:`.grammar`), from the first match of one of ``grammar_triggers`` (regexes) if any are given."""
        import codecs

        seq = self.submit(tokens, queue.Queue(), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                          logprobs=logprobs, cancel=cancel, cache_prompt=cache_prompt, grammar=grammar,
                          grammar_triggers=grammar_triggers)
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
                if isinstance(item, tuple):  # (its bytes, its record): logprobs were asked for
                    item, record = item
                    if records is not None:
                        records.append(record)
                text = decode.decode(item)
                if text:
                    yield text
            tail = decode.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            seq.cancel.set()
            seq.fill(t)

    def submit(self, tokens: Sequence[int], out, *, max_tokens: int = 256, temperature: float = 0.8,
               top_p: float = 0.95, seed: int | None = None, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, logprobs: int | None = None,
               cancel: threading.Event | None = None, cache_prompt: bool = True,
               grammar: str | None = None, grammar_triggers: Sequence[str] = ()) -> _Sequence:
        """Queue one sequence; the decode loop calls ``out.put`` with each token's bytes (with
        ``logprobs``: a tuple of its bytes and its :func:`.sampling.token_record`), then None at its end (or an
        exception), from its own thread (a runner sends them on from there: no thread between the
        loop and the connection). :meth:`generate` reads them from a queue."""
        if not tokens:
            raise InvalidValue("the prompt is empty", hint="give some text to continue")
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise prompt_too_long(len(tokens), self.n_ctx)
        import llama_cpp

        max_tokens = min(max_tokens, room)
        sampling = Sampling(temperature, top_p, seed, presence_penalty, frequency_penalty, grammar=grammar,
                            grammar_triggers=tuple(grammar_triggers))
        chain = sampler_chain(sampling, n_vocab=llama_cpp.llama_vocab_n_tokens(self._vocab), window=max_tokens,
                              vocab=self._vocab)
        seq = _Sequence(list(tokens), max_tokens, chain, out, threading.Event(), started=time.perf_counter(),
                        gone=cancel, logprobs=logprobs, cache=cache_prompt)
        with self._cond:
            if self._closed:
                llama_cpp_free_sampler(seq.sampler)
                raise ModelUnloaded("the model was unloaded", hint="send the request again: it is loaded anew")
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    # ------------------------------------------------------------ the decode loop

    def _admit(self) -> None:
        """Waiting requests take free sequences while their prompt and max_tokens fit the cache
        (cells other free sequences keep for the prompt cache give way, the oldest first)."""
        free = [i for i in range(self.n_seq) if i not in self._running]
        reserved = sum(len(q.tokens) + q.max_tokens for q in self._running.values())
        for seq in [q for q in self._waiting if q.cancelled()]:  # its client went away while it waited
            import llama_cpp

            self._waiting.remove(seq)
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.out.put(None)  # its reader ends
        while self._waiting and free:
            seq = self._waiting[0]
            slot, prefix = self._slot_for(seq, free)
            for i in [i for i in free if i in self._cached and (not seq.cache or (self._running and i != slot))]:
                self._forget(i)  # the exact mode; or others decode, whose attention would span kept cells
            need = len(seq.tokens) + seq.max_tokens
            others = [i for i in free if i != slot and i in self._cached]
            while others and reserved + need + sum(len(self._cached[i]) for i in others) > self.n_ctx:
                oldest = min(others, key=self._cached_at.__getitem__)
                self._forget(oldest)
                others.remove(oldest)
            if self._running and reserved + need > self.n_ctx:
                break  # it waits for room
            self._waiting.pop(0)
            free.remove(slot)
            seq.seq_id = slot
            seq.fed = seq.reused = self._reuse(slot, seq, prefix)
            reserved += need
            self._running[slot] = seq

    def _slot_for(self, seq: _Sequence, free: list[int]) -> tuple[int, int]:
        """The free sequence id for ``seq`` and how many of its prompt's tokens that id's cells hold:
        the longest match; with none, an id that keeps nothing, else the oldest kept."""
        best, best_len = -1, 0
        if seq.cache:
            for i in free:
                kept = self._cached.get(i)
                if kept:
                    n = _common_prefix(kept, seq.tokens)
                    if n > best_len:
                        best, best_len = i, n
        if best >= 0:
            return best, best_len
        empty = [i for i in free if i not in self._cached]
        return (empty[0] if empty else min(free, key=self._cached_at.__getitem__)), 0

    def _reuse(self, slot: int, seq: _Sequence, prefix: int) -> int:
        """Keep the first ``prefix`` cells of ``slot`` for ``seq`` (at least its last prompt token is
        evaluated again: its logits give the first token) and drop the rest; what was kept."""
        import llama_cpp

        kept = self._cached.pop(slot, None)
        self._cached_at.pop(slot, None)
        reuse = min(prefix, len(seq.tokens) - 1)
        if reuse < MIN_REUSE:
            reuse = 0
        memory = llama_cpp.llama_get_memory(self._ctx)
        if reuse > 0 and memory and kept is not None:
            # the cells must still be there (nothing else cleared the context) and, with a sliding
            # window, still hold what the tokens after ``reuse`` attend to (llama.cpp's server's rule)
            intact = llama_cpp.llama_memory_seq_pos_max(memory, slot) == len(kept) - 1
            pos_min = llama_cpp.llama_memory_seq_pos_min(memory, slot)
            if not intact or (self._n_swa > 0 and pos_min > max(0, reuse - self._n_swa)):
                reuse = 0
            elif not llama_cpp.llama_memory_seq_rm(memory, slot, reuse, -1):
                reuse = 0  # a recurrent model cannot cut a sequence: evaluate it all
        else:
            reuse = 0
        if reuse == 0 and memory:
            llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)  # whatever another user left there
        return reuse

    def _forget(self, seq_id: int) -> None:
        import llama_cpp

        self._cached.pop(seq_id, None)
        self._cached_at.pop(seq_id, None)
        memory = llama_cpp.llama_get_memory(self._ctx)
        if memory:
            llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)

    def forget_cache(self) -> None:
        """Drop what the prompt cache keeps (another user of the context is about to clear it)."""
        with self._cond:
            for seq_id in list(self._cached):
                self._forget(seq_id)

    def _finish(self, seq: _Sequence, error: BaseException | None = None) -> None:
        import llama_cpp

        # kept only while it decodes alone: with others running, the unified cache's attention spans
        # kept cells too (masked), which slows each of their steps
        alone = all(q is seq for q in self._running.values())
        kept = seq.in_cache() if error is None and seq.cache and alone else []
        if kept:
            self._finished += 1
            self._cached[seq.seq_id], self._cached_at[seq.seq_id] = kept, self._finished
        else:
            self._forget(seq.seq_id)
        llama_cpp.llama_sampler_free(seq.sampler)
        self._running.pop(seq.seq_id, None)
        seq.out.put(error if error is not None else None)

    def _loop(self) -> None:
        """The decode loop; an unexpected error in it fails every request (none waits for ever) and
        closes the decoder."""
        try:
            self._steps()
        except BaseException as exc:  # noqa: BLE001 - reported to every reader, then the thread ends
            with self._cond:
                self._closed = True
                for seq in list(self._running.values()) + self._waiting:
                    seq.out.put(OrionError(f"the decoder stopped ({type(exc).__name__}: {exc})",
                                           hint="run with --debug and report it"))
                self._running.clear()
                self._waiting.clear()
            raise

    def _steps(self) -> None:
        import llama_cpp

        batch = self._batch
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    for seq in list(self._running.values()) + self._waiting:
                        seq.out.put(ModelUnloaded("the model was unloaded",
                                                  hint="send the request again: it is loaded anew"))
                    return
                for seq in [q for q in self._running.values() if q.cancelled()]:
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
                        self._finish(seq, OrionError("llama.cpp could not decode this request (llama_decode failed)",
                                                     hint="a shorter prompt or max_tokens may fit"))
                continue
            self.steps += 1
            with self._cond:
                for seq in running:
                    if seq.logits_at < 0:
                        continue  # its prompt is not all in yet
                    token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.logits_at)
                    record = self._record(seq, token) if seq.logprobs is not None else None
                    seq.logits_at = -1
                    seq.generated += 1
                    seq.out_tokens.append(token)
                    if seq.generated == 1:
                        seq.first_token_at = time.perf_counter()
                    if llama_cpp.llama_vocab_is_eog(self._vocab, token) or seq.cancelled():
                        seq.eog = not seq.cancelled()
                        self._finish(seq)
                        continue
                    piece = self._piece(token)
                    seq.out.put(piece if record is None else (piece, record))
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

    def _record(self, seq: _Sequence, token: int) -> tuple:
        """The sampled ``token``'s :func:`.sampling.token_record`, from the logits of ``seq``'s row."""
        import llama_cpp

        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        logits = llama_cpp.llama_get_logits_ith(self._ctx, seq.logits_at)
        return token_record(logits, n_vocab, token, seq.logprobs, self._piece)

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
        # no timeout: the loop sees the flag between two decodes, and the batch and the model must not
        # be freed while llama_decode may still use them (a large prefill, a slow RPC server)
        self._thread.join()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cut_at_stops(pieces: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """``pieces`` up to the first stop string (not included); text that may be the start of one is
    held back until it is known not to be. Closing the result closes ``pieces``."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    pending = ""
    try:
        for piece in pieces:
            pending += piece
            cut = min((pending.find(s) for s in stops if s in pending), default=-1)
            if cut >= 0:
                if pending[:cut]:
                    yield pending[:cut]
                return
            if len(pending) > hold:
                out, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
                yield out
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    if pending:
        yield pending
