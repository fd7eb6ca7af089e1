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

    def seed32(self) -> int:
        """The seed as llama.cpp's 32-bit sampler takes it (any integer a client sends, reduced)."""
        return random.getrandbits(32) if self.seed is None else self.seed & 0xFFFFFFFF


def sampler_chain(sampling: Sampling):
    """A new ``llama_sampler`` chain for one sequence (the caller frees it with llama_sampler_free)."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
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
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed32(),
            "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
            "presence_penalty": 0.0}
