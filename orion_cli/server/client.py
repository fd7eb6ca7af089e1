"""The CLI's side of ``orion serve``: JSON and server-sent events over ``http.client``.

Standard library only (the CLI's start-up budget). Errors come back as the server's own
OpenAI-shaped message, raised as the orion error of the same class (the one table of
:mod:`.http_errors`, so the CLI exits as it would in-process); a server that stops
answering raises :class:`ServerGone`, which the CLI turns into in-process work.
"""

from __future__ import annotations

import http.client
import json
import os
from typing import Any, Iterator

from ..errors import OrionError
from .discovery import ServerInfo
from .http_errors import QueueFull, Unauthorized, error_from_body


class ServerGone(OrionError):
    """The server did not answer (it stopped, or was killed)."""


ServerBusy = QueueFull  # the server's queue for a model is full (HTTP 503)


class ServerError(OrionError):
    """Any other error the server reported."""


class ServerClient:
    def __init__(self, info: ServerInfo, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.info = info
        self.api_key = api_key if api_key is not None else os.environ.get("ORION_API_KEY")
        self.timeout = timeout

    def _send(self, method: str, path: str, body: Any = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = bearer(self.api_key)
        conn = http.client.HTTPConnection(self.info.host, self.info.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise ServerGone(f"orion serve at {self.info.url} did not answer: {exc}",
                             hint="start it again with 'orion serve', or pass --local") from exc
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise _error(response.status, raw, response.getheader("Retry-After"))
        return conn, response

    def get(self, path: str) -> Any:
        return self._json("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._json("POST", path, body)

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        conn, response = self._send(method, path, body)
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise ServerGone(f"orion serve at {self.info.url} stopped answering: {exc}",
                             hint="start it again with 'orion serve', or pass --local") from exc
        finally:
            conn.close()

    def events(self, method: str, path: str, body: Any = None) -> Iterator[Any]:
        """The ``data:`` payloads of a server-sent event stream, decoded (ends at ``[DONE]``)."""
        conn, response = self._send(method, path, body)
        try:
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise ServerGone(f"orion serve at {self.info.url} stopped in the middle: {exc}",
                                     hint="run again (with --local to work in-process)") from exc
                if not line:
                    raise ServerGone(f"orion serve at {self.info.url} closed the stream early",
                                     hint="run again (with --local to work in-process)")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                doc = json.loads(payload)
                if isinstance(doc, dict) and "error" in doc:
                    raise _error(doc["error"].get("status", 500), json.dumps(doc).encode())
                yield doc
        finally:
            conn.close()


def bearer(api_key: str) -> bytes:
    """The ``Authorization`` header's value for ``api_key``, as UTF-8 bytes (what the server compares,
    and what curl sends): http.client would encode a str as latin-1 and fail on any other character."""
    from ..errors import ConfigError

    key = api_key.encode("utf-8", "surrogateescape")  # a key from a non-UTF-8 environment: its own bytes
    if any(b < 0x20 or b == 0x7F for b in key):
        raise ConfigError("ORION_API_KEY has a control character (a line break?)",
                          hint="set it to the key the server was started with, on one line")
    return b"Bearer " + key


def _error(status: int, raw: bytes, retry_after: str | None = None) -> OrionError:
    """The error a server answered, as the orion error of the same class (by its code, else its status)."""
    try:
        err = json.loads(raw)["error"]
        message = str(err.get("message") or f"HTTP {status}")
    except (ValueError, KeyError, TypeError, AttributeError):
        err, message = None, f"HTTP {status}: {raw[:200].decode(errors='replace')}"
    exc = error_from_body(status, err, message, retry_after=retry_after)
    if isinstance(exc, Unauthorized):  # the client's side of the fix
        exc.hint = "set ORION_API_KEY to the key the server was started with"
    elif type(exc) is OrionError:
        exc = ServerError(exc.message, hint=exc.hint)
    return exc
