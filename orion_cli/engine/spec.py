"""What to load and how it went: values shared by the loader, the model and the manager's keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..estimate import EngineSettings


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


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    hit_limit: bool = False  # generation stopped at max_tokens or the end of the context (not on its own)
    cached_tokens: int = 0  # of prompt_tokens, those whose cells an earlier request left in the KV cache

    @property
    def prompt_tok_s(self) -> float:
        """The prompt tokens evaluated a second (those the prompt cache gave are not evaluated)."""
        return (self.prompt_tokens - self.cached_tokens) / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tok_s(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s else 0.0

    def to_dict(self) -> dict:
        return {"load_s": round(self.load_s, 3), "prompt_tokens": self.prompt_tokens,
                "prompt_tok_s": round(self.prompt_tok_s, 1), "generated_tokens": self.gen_tokens,
                "generation_tok_s": round(self.gen_tok_s, 1), "first_token_s": round(self.prompt_s, 4),
                "cached_prompt_tokens": self.cached_tokens}
