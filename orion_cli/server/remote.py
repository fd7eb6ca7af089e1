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
