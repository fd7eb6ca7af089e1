"""The OpenAI wire format's response documents: a chat or text completion whole or as a stream's
chunks (with logprobs), an embeddings list, a server-sent event. The requests are :mod:`.openai`'s."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- response documents


def _token_text(raw: bytes) -> str:
    """A token's text as the logprobs show it (a token that holds part of a character: U+FFFD for it;
    its ``bytes`` say which)."""
    return raw.decode("utf-8", "replace")


@dataclass
class Reply:
    """The documents of one chat or text completion: the whole answer, or its stream's chunks.

    ``logprobs`` (None: not asked for) is how many of the likeliest tokens each token's entry lists;
    ``prompt`` is what a completion's ``text_offset`` counts from (OpenAI's offsets are into the
    prompt followed by the text, with or without ``echo``)."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    logprobs: int | None = None
    prompt: str = ""
    _before: bytes = field(default=b"", init=False, repr=False)  # a completion's tokens so far (text_offset)

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def logprobs_document(self, records: list) -> dict | None:
        """The ``logprobs`` of a choice (or a chunk's) for these tokens' records: chat's
        ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}``, a completion's
        ``{tokens, token_logprobs, top_logprobs, text_offset}``; None when not asked for."""
        if self.logprobs is None:
            return None
        if self.chat:
            content = [{"token": _token_text(raw), "logprob": lp, "bytes": list(raw),
                        "top_logprobs": [{"token": _token_text(t), "logprob": tl, "bytes": list(t)}
                                         for t, tl in top[:self.logprobs]]}
                       for raw, lp, top in records]
            return {"content": content, "refusal": None}
        doc: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for raw, lp, top in records:
            doc["tokens"].append(_token_text(raw))
            doc["token_logprobs"].append(lp)
            likeliest: dict = {}
            for t, tl in [*top[:self.logprobs], (raw, lp)]:  # OpenAI's: the sampled token always, so up to n + 1
                likeliest.setdefault(_token_text(t), tl)
            doc["top_logprobs"].append(likeliest)
            doc["text_offset"].append(len(self.prompt) + len(self._before.decode("utf-8", "ignore")))
            self._before += raw
        return doc

    def whole(self, text: str, finish_reason: str, usage: dict, timings: dict, records: list | None = None) -> dict:
        logprobs = self.logprobs_document(records or [])
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage, "timings": timings}

    def tool_answer(self, content: str | None, calls: list[dict] | None, finish_reason: str, usage: dict,
                    timings: dict) -> dict:
        """A chat's answer when tools were offered: the calls (``content`` null, ``finish_reason``
        "tool_calls") or the reply."""
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else finish_reason}
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage, "timings": timings}

    def tool_piece(self, content: str | None, calls: list[dict] | None) -> dict:
        """A stream's one piece when tools were offered (the answer is known once it is whole)."""
        if calls:
            return self.piece({"tool_calls": [c | {"index": i} for i, c in enumerate(calls)]})
        return self.piece({"content": content or ""})

    def _chunk(self, choices: list) -> dict:
        return {"id": self.id, "object": f"{self.kind}.chunk" if self.chat else self.kind, "created": self.created,
                "model": self.model, "choices": choices}

    def start(self) -> list[dict]:
        """What a stream says before the first piece (a chat's role)."""
        return [self.piece({"role": "assistant", "content": ""})] if self.chat else []

    def piece(self, delta_or_text, finish_reason: str | None = None, records: list | None = None) -> dict:
        logprobs = self.logprobs_document(records) if records is not None else None
        if self.chat:
            body = {"index": 0, "delta": delta_or_text, "finish_reason": finish_reason}
            if logprobs is not None:
                body["logprobs"] = logprobs
        else:
            body = {"index": 0, "text": delta_or_text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._chunk([body])

    def text_piece(self, text: str, records: list | None = None) -> dict:
        """One piece of the text; ``records``: those of the tokens it begins (with logprobs)."""
        return self.piece({"content": text} if self.chat else text, records=records)

    def end(self, finish_reason: str) -> dict:
        return self.piece({} if self.chat else "", finish_reason)

    def usage_chunk(self, usage: dict, timings: dict) -> dict:
        return self._chunk([]) | {"usage": usage, "timings": timings}


def embeddings_document(vectors, fmt: str, model_id: str, n_tokens: int, truncated: int) -> dict:
    import base64

    data = []
    for i, v in enumerate(vectors):
        value = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "truncated_inputs": truncated}}


def sse(doc: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"
