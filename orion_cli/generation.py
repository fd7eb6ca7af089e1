"""One text generation as a client sees it: text out, stop strings, the finish reason and the usage.

One path for every text model, whatever its ``parallel``: the prompt's tokens
(:func:`orion_cli.engine.prompts.prompt_tokens`: the chat template, or the plain text), the model's
decoder (the one loop that runs every text request on that model, so concurrent requests never meet
in llama.cpp), and :func:`~orion_cli.engine.decoder.cut_at_stops` with the caller's stop strings and
the template's. The server's routes wrap it; it imports nothing of the server or the CLI.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence


class _Ends:
    """An iterator that records whether it ran to its end (the decoder stopped by itself: an end
    of generation or ``max_tokens``) or was closed early (a stop string was found)."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.ended = False

    def __iter__(self) -> "_Ends":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            self.ended = True
            raise

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


class Generation:
    """One generation (run it in a worker thread): :meth:`pieces` yields the text as it comes.

    ``options``: ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``presence_penalty``,
    ``frequency_penalty``, ``cache_prompt``, ``response_format`` (checked by the server: its grammar
    is made where the model is), and ``logprobs`` (a count: each token's log-probability is recorded,
    with that many of the likeliest tokens beside it; :meth:`new_records` hands them out with the text
    that holds them). ``chat``: None lets the model decide (its template applies when it has one),
    False asks for a plain completion of the text. ``prompt`` None: ``history`` is the whole
    conversation (a template's own tool format: it may end with a tool's result); ``tools``: the
    tools the template is rendered with.
    """

    def __init__(self, model, prompt: str | None, options: dict, stops: Sequence[str] = (), *,
                 chat: bool | None = None, system: str | None = None, history: Sequence[dict] | None = None,
                 tools: list[dict] | None = None) -> None:
        from .engine import Timings

        self.model, self.prompt, self.options, self.stops = model, prompt, dict(options), list(stops)
        self.response_format = self.options.pop("response_format", None)  # made a grammar by check_fits
        self.chat, self.system, self.history = chat, system, list(history or [])
        self.tools = tools  # for the chat template (a template with a tool format of its own)
        self.timings = Timings()
        self.text = ""
        self.finish_reason = "stop"
        self.completion_tokens = 0
        self._tokens: tuple[list[int], list[str]] | None = None
        # with logprobs: each generated token's (bytes, logprob, top), in order, as the decoder made them
        self.records: list | None = [] if self.options.get("logprobs") is not None else None
        self._emitted = 0  # UTF-8 bytes of the text given out so far
        self._taken = 0  # records handed out by new_records
        self._taken_bytes = 0  # their bytes

    @property
    def chat_format(self) -> str:
        """The format the prompt is evaluated in (:func:`orion_cli.messages.chat_format`: ``gguf``, a
        fallback's name such as ``gemma`` or ``transcript``, or ``none`` for plain text)."""
        return self.model.chat_format(self.system, self.history, self.chat)

    def prompt_tokens(self) -> tuple[list[int], list[str]]:
        """The prompt's tokens and the template's stop strings (computed once)."""
        if self._tokens is None:
            self._tokens = self.model.prompt_tokens(self.prompt, system=self.system, history=self.history,
                                                    chat=self.chat, tools=self.tools)
        return self._tokens

    def check_fits(self) -> None:
        """Raise the prompt-too-long error now (before a stream's first byte) rather than mid-stream."""
        from .engine.decoder import prompt_too_long

        if self.response_format is not None:  # a schema llama.cpp cannot follow: an error now too
            self.options["grammar"] = self.model.grammar_for(self.response_format)
            self.response_format = None
        n_tokens = len(self.prompt_tokens()[0])
        if n_tokens >= self.model.spec.n_ctx:
            raise prompt_too_long(n_tokens, self.model.spec.n_ctx)

    def pieces(self, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield text as it is generated, cut at the first stop string (text that may be the start
        of one held back); a set ``cancel`` ends it after the next piece (the client went away)."""
        from .engine.decoder import cut_at_stops

        if self.response_format is not None:
            self.check_fits()
        tokens, template_stops = self.prompt_tokens()
        stops = self.stops + [s for s in template_stops if s not in self.stops]
        options = self.options if self.records is None else self.options | {"records": self.records}
        decoded = _Ends(self.model.decoder().generate(tokens, timings=self.timings, cancel=cancel, **options))
        stream = cut_at_stops(decoded, stops)
        try:
            for piece in stream:
                if cancel is not None and cancel.is_set():
                    return
                self.text += piece
                self._emitted += len(piece.encode("utf-8", "surrogatepass"))
                yield piece
        finally:
            stream.close()
        self.completion_tokens = len(self.model.tokenize(self.text, special=False)) if self.text else 0
        if decoded.ended and self.timings.hit_limit:  # max_tokens, or the context ran out before it
            self.finish_reason = "length"

    def new_records(self) -> list:
        """The records of the tokens that begin in the text given out so far and were not handed
        out yet (a stream's piece carries those of the tokens it begins): the tokens of a stop string
        cut off are never handed out, a token that straddles the cut is. Empty without logprobs."""
        out = []
        records = self.records or []
        while self._taken < len(records) and self._taken_bytes < self._emitted:
            out.append(records[self._taken])
            self._taken_bytes += len(records[self._taken][0])
            self._taken += 1
        return out

    def run(self, cancel: threading.Event | None = None) -> str:
        """The whole text at once; a set ``cancel`` ends it early (the client went away)."""
        for _ in self.pieces(cancel):
            pass
        return self.text

    def usage(self) -> dict:
        return {"prompt_tokens": self.timings.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.timings.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.timings.cached_tokens}}
