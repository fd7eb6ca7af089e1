"""One sampler chain for every path: the CLI's runs, the server's batched requests, the REPL.

``top_p`` then ``temperature`` then a seeded draw (greedy at temperature 0), as OpenAI's parameters
say and nothing more: llama-cpp-python's own defaults (top_k 40, min_p 0.05) are not applied
anywhere, so the same request with the same seed gives the same text in-process and through
``orion serve``.
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
    grammar: str | None = None  # GBNF the text must follow (structured outputs: orion_cli.engine.grammar)

    def seed32(self) -> int:
        """The seed as llama.cpp's 32-bit sampler takes it (any integer a client sends, reduced)."""
        return random.getrandbits(32) if self.seed is None else self.seed & 0xFFFFFFFF


def sampler_chain(sampling: Sampling, vocab=None):
    """A new ``llama_sampler`` chain for one sequence (the caller frees it with llama_sampler_free).
    With a grammar (``vocab``: the model's), its sampler comes first: the tokens the grammar forbids
    are gone before top_p and the draw."""
    import llama_cpp

    from ..errors import InvalidValue

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.grammar:
        grammar = llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root")
        if not grammar:
            llama_cpp.llama_sampler_free(chain)
            raise InvalidValue("llama.cpp could not parse the grammar of this response format",
                               hint="run the server with --debug to see llama.cpp's message")
        llama_cpp.llama_sampler_chain_add(chain, grammar)
    if sampling.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(sampling.seed32()))
    return chain


def llama_cpp_sampling_kwargs(sampling: Sampling) -> dict:
    """The same chain as keyword arguments of llama-cpp-python's ``create_chat_completion`` (the
    vision path, which llama-cpp-python's chat handler drives): its extra samplers turned off."""
    kwargs = {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed32(),
              "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
              "presence_penalty": 0.0}
    if sampling.grammar:
        from llama_cpp.llama_grammar import LlamaGrammar

        kwargs["grammar"] = LlamaGrammar.from_string(sampling.grammar, verbose=False)
    return kwargs
