"""The encoder as a client of ``orion serve``: the same surface as :class:`orion_cli.embeddings.Encoder`.

``orion embed`` and ``orion search`` use it when a server is running, so the model is loaded
once, in the server, for every client. If the server stops answering in the middle, the work
goes on in this process from where it was: the file being embedded is embedded again
locally (nothing of it was stored yet), with a one-line notice.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .client import ServerClient, ServerGone

BATCH_TEXTS = 64  # texts per /v1/embeddings request (progress is reported between them)


class RemoteEncoder:
    def __init__(self, client: ServerClient, model: str | None, *, prefer_id: str | None = None,
                 fallback: Callable[[str], object] | None = None, notice: Callable[[str], None] | None = None) -> None:
        """``fallback(model_id)`` makes a local encoder for the same model and type, if the server goes."""
        self.client = client
        self.model = model or "minilm"
        info = client.post("/api/encoder", {"model": self.model, "prefer_id": prefer_id})
        self.model_id: str = info["id"]
        self.dim: int = int(info["dim"])
        self.max_tokens: int = int(info["max_tokens"])
        self._fallback = fallback
        self._notice = notice
        self.local = None  # the local encoder, once the server is gone

    def _go_local(self, exc: ServerGone):
        if self._fallback is None:
            raise exc
        if self.local is None:
            if self._notice:
                self._notice(f"orion serve stopped answering ({exc.message}); finishing in this process")
            self.local = self._fallback(self.model_id)
        return self.local

    def chunks(self, text: str):
        from ..embeddings import Chunk

        if self.local is None:
            try:
                doc = self.client.post("/api/chunk", {"model": self.model, "prefer_id": self.model_id, "text": text})
                return [Chunk(*row) for row in doc["chunks"]]
            except ServerGone as exc:
                self._go_local(exc)
        return self.local.chunks(text)

    def encode(self, texts: Sequence[str], on_done: Callable[[int], None] | None = None):
        """A float32 matrix, one normalised row per text."""
        import numpy as np

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        done = 0
        while done < len(texts) and self.local is None:
            part = list(texts[done: done + BATCH_TEXTS])
            try:
                doc = self.client.post("/v1/embeddings", {"model": self.model, "prefer_id": self.model_id,
                                                          "input": part})
            except ServerGone as exc:
                self._go_local(exc)
                break
            for item in doc["data"]:
                out[done + item["index"]] = item["embedding"]
            done += len(part)
            if on_done:
                on_done(len(part))
        if done < len(texts):
            out[done:] = self.local.encode(list(texts[done:]), on_done=on_done)
        return out
