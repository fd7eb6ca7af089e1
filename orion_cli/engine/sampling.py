"""One sampler chain for every path: the CLI's runs, the server's batched requests, the REPL.

The penalties (only when the request gives one), ``top_p``, then ``temperature``, then a seeded draw
(greedy at temperature 0), as OpenAI's parameters say and nothing more: llama-cpp-python's own
defaults (top_k 40, min_p 0.05, repeat_penalty 1.1) are not applied anywhere, so the same request with
the same seed gives the same text in-process and through ``orion serve``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn."""

    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None  # None: a fresh random seed
    # OpenAI's: subtracted from the logit of a token already generated, once (presence) and for each
    # time it was (frequency); the prompt's tokens do not count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None  # GBNF the text must follow (structured outputs: orion_cli.engine.grammar)
    # regexes: the grammar holds the text only from the first match of one (llama.cpp's lazy grammar,
    # from the match's first group): tool calls a model may make or not (orion_cli.tool_formats)
    grammar_triggers: tuple[str, ...] = ()

    def seed32(self) -> int:
        """The seed as llama.cpp's 32-bit sampler takes it (any integer a client sends, reduced)."""
        return random.getrandbits(32) if self.seed is None else self.seed & 0xFFFFFFFF

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def sampler_chain(sampling: Sampling, *, n_vocab: int = 0, window: int = 0, vocab=None):
    """A new ``llama_sampler`` chain for one sequence (the caller frees it with llama_sampler_free).
    ``window``: how many of the latest generated tokens the penalties count (the whole completion:
    its ``max_tokens``); ``n_vocab``, the model's vocabulary size, as llama.cpp's penalties take it.
    With a grammar (``vocab``: the model's), its sampler comes first: the tokens the grammar forbids
    are gone before the penalties, top_p and the draw."""
    import llama_cpp

    from ..errors import InvalidValue

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.grammar:
        if sampling.grammar_triggers:
            import ctypes

            patterns = (ctypes.c_char_p * len(sampling.grammar_triggers))(
                *[p.encode() for p in sampling.grammar_triggers])
            grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, sampling.grammar.encode(), b"root", patterns, len(sampling.grammar_triggers), None, 0)
        else:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root")
        if not grammar:
            llama_cpp.llama_sampler_free(chain)
            raise InvalidValue("llama.cpp could not parse the grammar of this response format",
                               hint="run the server with --debug to see llama.cpp's message")
        llama_cpp.llama_sampler_chain_add(chain, grammar)
    if sampling.penalised:
        # (n_vocab, penalty_last_n, penalty_repeat: 1.0 is off, penalty_freq, penalty_present): the
        # signature of llama-cpp-python 0.3.36's binding and its library; the generated tokens are
        # counted as llama_sampler_sample accepts them
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_penalties(
            n_vocab, max(1, window), 1.0, sampling.frequency_penalty, sampling.presence_penalty))
    if sampling.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(sampling.seed32()))
    return chain


def llama_cpp_sampling_kwargs(sampling: Sampling) -> dict:
    """The same chain as keyword arguments of llama-cpp-python's ``create_chat_completion`` (the
    vision path, which llama-cpp-python's chat handler drives): its extra samplers turned off, the
    penalties as asked (llama-cpp-python counts them over its last 64 tokens)."""
    kwargs = {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed32(),
              "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
              "frequency_penalty": sampling.frequency_penalty, "presence_penalty": sampling.presence_penalty}
    if sampling.grammar:
        from llama_cpp.llama_grammar import LlamaGrammar

        kwargs["grammar"] = LlamaGrammar.from_string(sampling.grammar, verbose=False)
    return kwargs


def token_record(logits, n_vocab: int, token: int, top: int, piece) -> tuple:
    """``(bytes, logprob, [(bytes, logprob), ...])``: the sampled ``token``'s text and log-probability,
    and the ``top`` likeliest tokens' (most likely first), from one row of ``logits`` (a ctypes float
    pointer, ``n_vocab`` long) by log-softmax: the model's own distribution, before the penalties,
    ``top_p`` and the temperature reshape it for the draw. ``piece`` gives a token's bytes."""
    import numpy as np

    row = np.ctypeslib.as_array(logits, shape=(n_vocab,)).astype(np.float64)
    peak = row.max()
    log_total = peak + np.log(np.exp(row - peak).sum())
    best: list = []
    if top > 0:
        ids = np.argpartition(-row, top - 1)[:top] if top < n_vocab else np.arange(n_vocab)
        ids = ids[np.lexsort((ids, -row[ids]))]  # likeliest first; a tie by token id
        best = [(piece(int(i)), float(row[i] - log_total)) for i in ids]
    return piece(token), float(row[token] - log_total), best
