"""A conversation with a model: the system prompt, the turns so far, and a backend that answers.

:class:`ChatSession` is what ``orion run`` drives, once (a prompt) or line by line (the REPL),
whoever answers: :class:`LocalChat` in this process, through the model manager, or a backend the
server layer gives (``orion_cli.server.remote``: the running ``orion serve``). A backend has:

- ``name`` (the model talked to), ``via`` (the server's URL; None in this process),
- ``keeps_turns`` (whether the turns are passed on: every model of orion's keeps them now, a model
  without a chat template in its family's format or a transcript, :func:`orion_cli.messages.chat_format`),
- ``reply(prompt, *, system, history, images, timings)``: the answer, piece by piece,
- ``load(name)`` (switch models), ``loaded()`` (what is loaded, as ``GET /api/orion/ps`` shapes it),
  ``close()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from .errors import NetworkError


class AnswerLost(Exception):
    """Raised by a backend whose answer was lost before it could be seen and that can answer again
    now: the session asks again, once. (The server layer raises :class:`AnswerCut` instead once a
    piece has been given: asked again, the answer would be printed twice.)"""


class AnswerCut(NetworkError):
    """The answer stopped half-way and will not come back (the server answering it went away): the
    pieces given are kept, in the conversation as on the screen, and the turn ends with this error
    (exit code 6). The backend may answer the next prompt another way (in this process)."""


class ChatBackend(Protocol):
    name: str
    via: str | None
    keeps_turns: bool

    def reply(self, prompt: str, *, system: str | None = None, history: Sequence[dict] = (),
              images: Sequence[Path] = (), timings: Any = None) -> Iterator[str]: ...

    def load(self, name: str) -> None: ...

    def loaded(self) -> dict: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Reply:
    text: str
    model: str  # the model that answered
    via: str | None  # the server that answered; None: this process


class ChatSession:
    """The conversation: ``send`` a prompt, the answer streams to ``on_piece``, and the turn is kept
    (when the backend keeps turns). An answer stopped with Ctrl-C is kept as far as it came."""

    def __init__(self, backend: ChatBackend, *, system: str | None = None, history: list[dict] | None = None) -> None:
        self.backend = backend
        self.system = system
        self.history: list[dict] = history if history is not None else []

    def messages(self, prompt: str) -> list[dict]:
        """What the model is asked for ``prompt``: the system prompt, the turns so far, the prompt
        (built by the engine's one builder of chat messages, which the server's template reads)."""
        from .messages import chat_messages

        return chat_messages(self.system, self.history, prompt)

    def send(self, prompt: str, on_piece: Callable[[str], None] = lambda piece: None, *,
             on_restart: Callable[[], None] = lambda: None, images: Sequence[Path] = (), timings: Any = None,
             on_cut: Callable[[], None] | None = None) -> Reply:
        """Ask ``prompt``; each piece of the answer goes to ``on_piece`` as it comes. When the backend
        loses the answer before it could be seen (:class:`AnswerLost`), ``on_restart()`` is called and
        it is asked again. An answer cut half-way (:class:`AnswerCut`) is kept as far as it came, like
        one stopped with Ctrl-C: ``on_cut()`` (by default ``on_restart()``: both end the line the
        answer was printed on) is called and the error raised. Another error (a prompt past the
        context...) leaves the conversation as it was."""
        pieces: list[str] = []
        try:
            try:
                self._stream(prompt, pieces, on_piece, images, timings)
            except AnswerLost:
                on_restart()
                pieces.clear()
                self._stream(prompt, pieces, on_piece, images, timings)
        except AnswerCut:
            (on_cut or on_restart)()
            self._keep(prompt, "".join(pieces))
            raise
        except KeyboardInterrupt:
            self._keep(prompt, "".join(pieces))
            raise
        text = "".join(pieces)
        self._keep(prompt, text)
        return Reply(text, self.backend.name, self.backend.via)

    def _stream(self, prompt: str, pieces: list[str], on_piece, images, timings) -> None:
        answer = self.backend.reply(prompt, system=self.system, history=self.history, images=images, timings=timings)
        try:
            for piece in answer:
                pieces.append(piece)
                on_piece(piece)
        finally:
            close = getattr(answer, "close", None)
            if close is not None:  # a generator left half-way releases the model it holds now
                close()

    def _keep(self, prompt: str, text: str) -> None:
        if self.backend.keeps_turns:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]

    def load(self, name: str) -> None:
        """Talk to another model from now on (a fresh conversation); a wrong name changes nothing."""
        self.backend.load(name)
        self.history.clear()

    def clear(self) -> None:
        self.history.clear()

    def loaded(self) -> dict:
        return self.backend.loaded()

    def close(self) -> None:
        self.backend.close()


class LocalChat:
    """The backend that answers in this process, through the model manager (the strategy's cap,
    budget and keep-alive); the session's history is passed on (a model without a chat template gets
    it in a fallback format: :func:`orion_cli.messages.chat_format`).
    ``progress`` draws the first load; ``on_model(model)`` sees the model once it is loaded."""

    via = None

    def __init__(self, manager, local, strategy, sampling: dict, *, progress: Callable[[float], None] | None = None,
                 on_model: Callable[[Any], None] | None = None) -> None:
        from .loading import model_request

        self.manager = manager
        self.local = local
        self.strategy = strategy
        self.sampling = sampling
        self.request = model_request(local, strategy, progress=progress)
        self.keeps_turns = True
        self._on_model = on_model

    @property
    def name(self) -> str:
        return self.local.name

    def reply(self, prompt: str, *, system: str | None = None, history: Sequence[dict] = (),
              images: Sequence[Path] = (), timings: Any = None) -> Iterator[str]:
        with self.manager.use(self.request) as model:
            if timings is not None:
                timings.load_s = model.load_s
            if self._on_model is not None:
                self._on_model(model)
            yield from model.generate(prompt, system=system, images=images, history=history, timings=timings,
                                      **self.sampling)

    def load(self, name: str) -> None:
        from .loading import local_model, model_request

        local = local_model(name, self.strategy)
        request = model_request(local, self.strategy)
        with self.manager.use(request):
            pass
        self.local, self.request = local, request

    def loaded(self) -> dict:
        """The models loaded here, shaped as ``GET /api/orion/ps`` answers, with this manager's keep-alive."""
        models = [{"name": s.name, "estimate_bytes": s.estimate_bytes, "in_use": s.in_use, "idle_s": s.idle_s,
                   "pinned": s.pinned} for s in self.manager.status()]
        return {"models": models, "max_models": self.manager.max_models, "budget_bytes": self.manager.budget_bytes,
                "keep_alive_s": self.manager.keep_alive_s}

    def close(self) -> None:
        self.manager.close()
