"""The work of ``orion serve`` seen from a client, and the policy "the server if one runs, else this
process": :class:`EncoderSource` for ``orion embed`` and ``orion search``, :func:`chat_backend` for
``orion run`` (the backend a :class:`orion_cli.chat.ChatSession` drives).

With a server running, the model is loaded once, in the server, for every client. A server that
does not answer ``/health`` at the start (frozen, busy past its deadline, not this home's) is not
used: the work is done here, with a one-line notice. If the server stops answering in the middle,
the work goes on in this process from where it was, with a one-line notice: the file being
embedded is embedded again locally (nothing of it was stored yet); an answer the server had not
begun is asked here. An answer the server had begun streaming ends where it stopped, with an
error (:class:`orion_cli.chat.AnswerCut`: asked again, it would be printed twice); the
conversation goes on here from the next prompt.

A model the user names by path (a file or folder of this machine, not a registered name) is sent
to the server absolute when the server takes paths (``orion serve --allow-paths``, as its
``/health`` says); to a server that takes only its registered models it is not sent at all: that
work is done here, with a one-line notice (:func:`kept_here`). A registered name always goes to
the server, and a model the server refuses for another reason keeps the server's error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

from .client import ServerClient, ServerGone
from .discovery import ServerInfo

Notice = Callable[[str], None]

BATCH_TEXTS = 64  # texts per /v1/embeddings request (progress is reported between them)


# ---------------------------------------------------------------- a model of the user's own


def _type_split(model: str, encoder: bool) -> tuple[str, str]:
    """An encoder's ``NAME@TYPE`` as :func:`orion_cli.loading.encoder_model` reads it: (``NAME``,
    ``@TYPE``) when the whole text is not a file; anything else is (``model``, "")."""
    if encoder:
        from ..convert import TARGETS

        base, at, suffix = model.rpartition("@")
        if at and base and suffix.lower() in TARGETS and not _is(_expand(model), "exists"):
            return base, at + suffix
    return model, ""


def _expand(text: str) -> Path:
    """``text`` as this process reads a path (``~user`` for a user this machine does not have: NotFound)."""
    from ..models import user_path

    return user_path(text)


def _is(path: Path, test: str) -> bool:
    """``path.exists()`` or ``path.is_dir()``, False where the file system cannot say (a name too long
    for it, a folder that may not be searched): this process's own resolution then says why."""
    try:
        return getattr(path, test)()
    except OSError:
        return False


def local_path(model: str, *, encoder: bool = False) -> Path | None:
    """The file or folder of this machine that ``model`` names, read as this process reads it
    (None: a name for the server to resolve, a registered one, the catalog's, a Hub repo).

    As :func:`orion_cli.models.resolve`: a name registered here or in the catalog is a name; else a
    path that exists, or has a GGUF path's shape (``x.gguf``, ``./x.gguf``, ``~/x.gguf``,
    ``/x.gguf``), or starts ``/``, ``./``, ``../`` or ``~``. For an encoder (as
    :func:`orion_cli.loading.encoder_model`) an existing folder comes first, and ``@TYPE`` is not
    part of the path."""
    text, _ = _type_split(model, encoder)
    if not text.strip():
        return None
    path = _expand(text)
    if encoder and _is(path, "is_dir"):
        return path
    shaped = text.startswith(("/", "./", "../", "~")) or (
        text.endswith(".gguf") and ("/" not in text or text.startswith(".")))
    if not (shaped or _is(path, "exists")):
        return None
    from ..models import Registry, catalog

    registered = Registry().all()
    if model in registered or text in registered or text in catalog():
        return None
    return path


def server_name(model: str, *, encoder: bool = False) -> str:
    """The name to send to a server: a path of this machine made absolute (the server's folder is
    not ours; an encoder's ``@TYPE`` kept), anything else as typed. The one rule for every model
    the CLI sends (``orion run``, the REPL's ``/load``, ``orion embed``/``search``, ``orion load``)."""
    path = local_path(model, encoder=encoder)
    if path is None:
        return model
    return str(path.absolute()) + _type_split(model, encoder)[1]


def kept_here(info: ServerInfo, model: str | None, *, encoder: bool = False) -> Path | None:
    """The file or folder of this machine that ``model`` names when the server ``info`` takes only
    its registered models (it would answer 404): that work is done in this process. None: send it
    (a name, or a server started with --allow-paths, which gets the path absolute)."""
    if model is None or info.allow_paths:
        return None
    return local_path(model, encoder=encoder)


def kept_notice(info: ServerInfo, model: str) -> str:
    """The one line that says a model of the user's own is run in this process, not by the server
    (it names no place to go on: each caller adds its own)."""
    return (f"the server at {info.url} takes only its registered models, not {model} "
            f"(orion import it, or start the server with --allow-paths)")


class RemoteEncoder:
    def __init__(self, client: ServerClient, model: str | None, *, prefer_id: str | None = None,
                 fallback: Callable[[str], object] | None = None, notice: Callable[[str], None] | None = None) -> None:
        """``fallback(model_id)`` makes a local encoder for the same model and type, if the server goes."""
        self.client = client
        self.model = server_name(model or "minilm", encoder=True)  # a folder or GGUF of this machine: absolute
        info = client.post("/api/orion/encoder", {"model": self.model, "prefer_id": prefer_id})
        self.model_id: str = info["id"]
        self.dim: int = int(info["dim"])
        self.max_tokens: int = int(info["max_tokens"])
        self._fallback = fallback
        self._notice = notice
        self.local = None  # the local encoder, once the server is gone
        import threading

        self._going_local = threading.Lock()  # `orion embed` chunks and encodes from threads of its own

    def _go_local(self, exc: ServerGone):
        if self._fallback is None:
            raise exc
        with self._going_local:
            if self.local is None:
                if self._notice:
                    self._notice(f"orion serve stopped answering ({exc.message}); finishing in this process")
                self.local = self._fallback(self.model_id)
        return self.local

    # what `orion embed`'s pipeline asks of an encoder (orion_cli.embeddings.Encoder has the same):
    # the server tokenises, so the "sequences" are the texts
    batch_size = BATCH_TEXTS

    def sequences(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def encode_sequences_f16(self, texts: Sequence[str]) -> list[bytes]:
        return self.encode_f16(texts)

    def chunks_and_sequences(self, text: str) -> tuple[list, list[str]]:
        chunks = self.chunks(text)
        return chunks, [c.text for c in chunks]

    def chunks(self, text: str):
        from ..chunks import Chunk

        if self.local is None:
            try:
                doc = self.client.post("/api/orion/chunk",
                                       {"model": self.model, "prefer_id": self.model_id, "text": text})
                return [Chunk(*row) for row in doc["chunks"]]
            except ServerGone as exc:
                self._go_local(exc)
        return self.local.chunks(text)

    def _remote_rows(self, texts: Sequence[str], on_done: Callable[[int], None] | None) -> list:
        """float32 rows (``array('f')``) for the texts the server embedded, in order; fewer than
        ``texts`` when it stopped answering (then :attr:`local` does the rest)."""
        import base64
        import sys
        from array import array

        rows: list = []
        while len(rows) < len(texts) and self.local is None:
            part = list(texts[len(rows): len(rows) + BATCH_TEXTS])
            try:
                doc = self.client.post("/v1/embeddings", {"model": self.model, "prefer_id": self.model_id,
                                                          "input": part, "encoding_format": "base64"})
            except ServerGone as exc:
                self._go_local(exc)
                break
            got: list = [None] * len(part)
            for item in doc["data"]:
                row = array("f", base64.b64decode(item["embedding"]))  # little-endian float32
                if sys.byteorder == "big":
                    row.byteswap()
                got[item["index"]] = row
            rows += got
            if on_done:
                on_done(len(part))
        return rows

    def encode(self, texts: Sequence[str], on_done: Callable[[int], None] | None = None):
        """A float32 matrix, one normalised row per text."""
        import numpy as np

        rows = self._remote_rows(texts, on_done)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = row
        if len(rows) < len(texts):
            out[len(rows):] = self.local.encode(list(texts[len(rows):]), on_done=on_done)
        return out

    def encode_f16(self, texts: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[bytes]:
        """Each text's vector as float16 bytes, as the store keeps them, without numpy (a client
        process stays small): struct's 'e' format rounds half to even, as numpy's float16 does."""
        import struct

        pack = struct.Struct(f"<{self.dim}e").pack
        out = [pack(*row) for row in self._remote_rows(texts, on_done)]
        if len(out) < len(texts):
            out += self.local.encode_f16(list(texts[len(out):]), on_done=on_done)
        return out


class EncoderSource:
    """Where encoding happens: a running 'orion serve' (one encoder for every client), or this
    process through the model manager (``local=True``, no server, or one that did not answer);
    loaded only when asked for (a re-run over an unchanged corpus loads nothing). If the server
    stops answering, the work finishes here. ``notice`` gets the one line that says so."""

    def __init__(self, model: str | None, collection_model: str | None = None, *, local: bool = False,
                 notice: Notice | None = None) -> None:
        import contextlib

        self.model = model
        self._notice = notice or (lambda line: None)
        self._stack = contextlib.ExitStack()
        self._manager = None
        self.remote: RemoteEncoder | None = None if local else self._remote_encoder(collection_model)
        if self.remote is not None:
            self.model_id, self.dim, self.via = self.remote.model_id, self.remote.dim, self.remote.client.info.url
        else:
            self._setup_local(collection_model)
            self.via = "this process"

    def _remote_encoder(self, collection_model: str | None) -> RemoteEncoder | None:
        """The running server's encoder, or None (no server, or it did not answer)."""
        from .discovery import live_server

        info = live_server(notice=lambda line: self._notice(f"{line}; working in this process"))
        if info is None:
            return None
        path = kept_here(info, self.model, encoder=True)
        if path is not None:  # a folder or GGUF of this machine, which the server does not take
            if _is(path, "exists"):  # (nothing there: this process's error says so)
                self._notice(f"{kept_notice(info, self.model)}; working in this process")
            return None
        try:
            return RemoteEncoder(ServerClient(info), self.model, prefer_id=collection_model,
                                 fallback=self._local_encoder, notice=self._notice)
        except ServerGone as exc:
            self._notice(f"{exc.message}; working in this process")
            return None

    def _setup_local(self, prefer_id: str | None) -> None:
        from ..gguf_header import read_local_header
        from ..loading import encoder_model, manager_for, model_request
        from ..strategy import load_strategy

        strategy = load_strategy()
        local, self.model_id, self.max_tokens = encoder_model(self.model, strategy, prefer_id=prefer_id)
        self._manager = manager_for(strategy)
        self._request = model_request(local, strategy, n_ctx=self.max_tokens, embedding=True)
        self.dim = read_local_header(Path(local.path)).n_embd

    def _local_encoder(self, model_id: str | None = None):
        from ..embeddings import Encoder

        if self._manager is None:  # the server went away: the same model and type, here
            self._setup_local(model_id)
        loaded = self._stack.enter_context(self._manager.use(self._request))
        return Encoder(loaded, model_id=self.model_id, max_tokens=self.max_tokens)

    def make(self):
        """The encoder (the server's, or one loaded here now)."""
        return self.remote if self.remote is not None else self._local_encoder()

    def close(self) -> None:
        self._stack.close()
        if self._manager is not None:
            self._manager.close()


# ---------------------------------------------------------------- chat


class RemoteChat:
    """A chat backend (see :class:`orion_cli.chat.ChatSession`) answered by ``orion serve``."""

    keeps_turns = True  # the server formats the conversation (the model's template, or a fallback format)

    def __init__(self, client: ServerClient, model: str, sampling: dict) -> None:
        self.client = client
        self.name = server_name(model)
        self.sampling = {k: v for k, v in sampling.items() if v is not None}
        self.via: str | None = client.info.url

    def reply(self, prompt: str, *, system: str | None = None, history: Sequence[dict] = (),
              images: Sequence[Path] = (), timings=None) -> Iterator[str]:
        """The server's answer, piece by piece (its timings into ``timings``)."""
        from ..messages import (
            chat_messages,  # the one builder (a leaf: the client path imports no engine)
        )

        body = {"model": self.name, "messages": chat_messages(system, history, prompt),
                "stream": True, "stream_options": {"include_usage": True}, **self.sampling}
        for doc in self.client.events("POST", "/v1/chat/completions", body):
            if doc.get("timings") and timings is not None:
                t = doc["timings"]
                timings.load_s, timings.prompt_tokens, timings.gen_tokens = t["load_s"], t["prompt_tokens"], \
                    t["generated_tokens"]
                timings.prompt_s = t["prompt_tokens"] / t["prompt_tok_s"] if t["prompt_tok_s"] else 0.0
                timings.gen_s = t["generated_tokens"] / t["generation_tok_s"] if t["generation_tok_s"] else 0.0
            for choice in doc.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    yield piece

    def load(self, name: str) -> None:
        name = server_name(name)
        self.client.post("/api/orion/load", {"model": name})
        self.name = name  # only once loaded: a wrong name keeps the model talked to

    def loaded(self) -> dict:
        """The server's ``/api/orion/ps``: ``models`` (name, estimate_bytes, in_use, idle_s, pinned...),
        ``max_models``, ``budget_bytes``."""
        return self.client.get("/api/orion/ps")

    def close(self) -> None:
        return None


class ServedChat:
    """A chat backend that is the server's while it answers, and this process's after: when the
    server goes, ``notice`` says so once and ``make_local(name)`` makes the in-process backend.

    - Gone before the answer began (no piece given yet): the answer is asked here, unseen.
    - Gone half-way: the answer ends there, raising :class:`orion_cli.chat.AnswerCut` (the pieces
      given stay given: asked again, they would be printed twice); the next call moves here.

    A file of this machine that ``server`` (the :class:`ServerInfo` the remote talks to) does not
    take (:func:`kept_here`) is answered here too, with one notice, from the start (``orion run
    ./x.gguf``) or from a REPL's ``/load ./x.gguf``; the server still answers the registered names
    loaded after it (the backend made here is closed then).
    """

    def __init__(self, remote: RemoteChat, make_local: Callable[[str], object], notice: Notice | None = None, *,
                 server: ServerInfo | None = None) -> None:
        self.remote = remote
        self.local = None
        self.server = server
        self._make_local = make_local
        self._notice = notice or (lambda line: None)
        self._gone: ServerGone | None = None  # the server went half-way through an answer
        self._server_gone = False  # the server went: everything is answered here from now on

    @property
    def current(self):
        return self.local if self.local is not None else self.remote

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def via(self) -> str | None:
        return self.current.via

    @property
    def keeps_turns(self) -> bool:
        return self.current.keeps_turns

    def _go_local(self, exc: ServerGone):
        self._notice(exc.message)
        self._server_gone = True
        if self.local is None:
            self.local = self._make_local(self.remote.name)
        return self.local

    def _served(self) -> bool:
        """Whether the server still answers for this session (after a cut, the next call moves here)."""
        if self.local is None and self._gone is not None:
            self._go_local(self._gone)
        return self.local is None

    def _kept(self, name: str) -> Path | None:
        return None if self.server is None else kept_here(self.server, name)

    def start_here(self, name: str) -> None:
        """Answer ``name`` in this process from the start (a file the server does not take)."""
        path = self._kept(name)
        self.local = self._make_local(name)  # a wrong path raises here, before any notice
        if path is not None and _is(path, "exists"):
            self._notice(kept_notice(self.server, name))

    def reply(self, prompt: str, **kwargs) -> Iterator[str]:
        if self._served():
            given = False
            answer = self.remote.reply(prompt, **kwargs)
            try:
                for piece in answer:
                    given = True
                    yield piece
                return
            except ServerGone as exc:
                if given:
                    from ..chat import AnswerCut

                    self._gone = exc
                    raise AnswerCut(f"{exc.message}; the answer is cut short there",
                                    hint="ask again (without the server, orion answers in this process)") from exc
                self._go_local(exc)  # nothing given yet: answered here, once
            finally:
                answer.close()  # left half-way (Ctrl-C): the stream's connection closes now
        yield from self.local.reply(prompt, **kwargs)

    def load(self, name: str) -> None:
        """Switch models (a wrong name changes nothing): on the server while it answers, here for a
        file it does not take (or once it went)."""
        if self._gone is not None and not self._server_gone:
            self._go_local(self._gone)  # it went half-way through the last answer
        if not self._server_gone:
            path = self._kept(name)
            if path is None:
                try:
                    self.remote.load(name)
                except ServerGone as exc:
                    self._go_local(exc)
                else:
                    if self.local is not None:  # a file answered here until now: the server again
                        local, self.local = self.local, None
                        local.close()
                    return
            elif self.local is None:  # a file the server does not take: this process, from now on
                local = self._make_local(name)
                try:
                    local.load(name)
                except BaseException:
                    local.close()
                    raise
                self.local = local
                self._notice(kept_notice(self.server, name))
                return
        self.local.load(name)

    def loaded(self) -> dict:
        if self._served():
            try:
                return self.remote.loaded()
            except ServerGone as exc:
                self._go_local(exc)
        return self.local.loaded()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()


def chat_backend(model: str, sampling: dict, make_local: Callable[[str], object], *, local: bool = False,
                 notice: Notice | None = None):
    """The backend that answers ``model``: the running server's (falling back to
    ``make_local(name)`` if it goes away), else ``make_local(model)``. ``notice(message)`` is
    called once, with the server's last word, when the work moves here (or with why a server that
    is there is not used: it did not answer ``/health``, it is not this home's; or why a file of
    this machine is answered here: the server takes only its registered models)."""
    if not local:
        from .discovery import live_server

        info = live_server(notice=notice)
        if info is not None:
            served = ServedChat(RemoteChat(ServerClient(info), model, sampling), make_local, notice, server=info)
            if kept_here(info, model) is not None:
                served.start_here(model)
            return served
    return make_local(model)
