"""The CLI's side of ``orion serve``: JSON and server-sent events over ``http.client``.

Standard library only (the CLI's start-up budget). Errors come back as the server's own
OpenAI-shaped message, raised as the orion error of the same class (the one table of
:mod:`.http_errors`, so the CLI exits as it would in-process); a server that stops
answering raises :class:`ServerGone`, which the CLI turns into in-process work.

Deadlines: the connection opens within 2 s; then each read waits ``timeout`` seconds
(``ORION_SERVER_TIMEOUT``, default 30) for the server's next byte, the first one of a reply and
each piece of a stream alike. Past that, ``/health`` is asked on a connection of its own: a server
that answers there is working (loading a model, a queue ahead) and the wait goes on; one that does
not has stopped answering (:class:`ServerGone`). A wait with no byte at all ends after
:data:`MAX_SILENCE_S` however the server answers ``/health``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import time
from typing import Any, Callable, Iterator

from ..errors import NetworkError, OrionError
from .discovery import (
    CONNECT_TIMEOUT_S,
    NoAnswer,
    ServerInfo,
    health_doc,
    health_timeout,
    not_this_server,
    server_timeout,
)
from .http_errors import QueueFull, Unauthorized, error_from_body

MAX_SILENCE_S = 600.0  # no byte for this long: gone, even if /health still answers


class ServerGone(NetworkError):
    """The server did not answer (it stopped, froze, or was killed): exit code 6 if not handled."""


class _Stalled(TimeoutError):
    """No byte for the read deadline, and the server does not answer /health either."""


def _readable(sock, timeout: float) -> bool:
    """Whether ``sock`` has a byte to read (or an end, or an error) within ``timeout`` seconds."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    return bool(select.select([sock], [], [], timeout)[0])


class _PatientReader(io.RawIOBase):
    """The socket read as a file that waits for the server while the server is alive: each read
    waits up to ``wait_s`` for a byte; past that, ``still_there()`` (None: it answers ``/health``)
    decides whether to wait again or fail with :class:`_Stalled`."""

    def __init__(self, sock, wait_s: float, still_there: Callable[[], str | None]) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # holds the socket open as http.client expects
        self._wait_s = wait_s
        self._still_there = still_there

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        started = time.monotonic()
        while not _readable(self._sock, self._wait_s):
            silent = time.monotonic() - started
            why = self._still_there() if silent < MAX_SILENCE_S else f"no byte for {silent:.0f} s"
            if why is not None:
                raise _Stalled(f"no byte for {silent:.1f} s, and {why}")
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _SocketFile:
    """What :class:`http.client.HTTPResponse` asks its socket for: a file over a patient reader."""

    def __init__(self, sock, wait_s: float, still_there: Callable[[], str | None]) -> None:
        self._args = sock, wait_s, still_there

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(_PatientReader(*self._args))


ServerBusy = QueueFull  # the server's queue for a model is full (HTTP 503)


class ServerError(OrionError):
    """Any other error the server reported."""


class ServerClient:
    def __init__(self, info: ServerInfo, api_key: str | None = None, timeout: float | None = None) -> None:
        """``timeout``: seconds to wait for the server's next byte before asking ``/health``
        whether it still runs (default ``ORION_SERVER_TIMEOUT``, else 30)."""
        self.info = info
        self.api_key = api_key if api_key is not None else os.environ.get("ORION_API_KEY")
        self.timeout = server_timeout() if timeout is None else timeout
        self.health_timeout = min(health_timeout(), self.timeout)

    def still_there(self) -> str | None:
        """None when the server answers ``/health`` as itself; else why not (for the message)."""
        try:
            doc = health_doc(self.info, self.health_timeout)
        except NoAnswer as exc:
            return f"/health did not answer either ({exc})"
        return not_this_server(doc, self.info, None)

    def _connection(self) -> http.client.HTTPConnection:
        """A connection opened within :data:`CONNECT_TIMEOUT_S`; its reads wait patiently."""
        conn = http.client.HTTPConnection(self.info.host, self.info.port, timeout=min(CONNECT_TIMEOUT_S, self.timeout))
        conn.connect()
        conn.sock.settimeout(self.timeout)  # sending: a frozen server's full buffer fails after this
        patience = _SocketFile(conn.sock, self.timeout, self.still_there)
        conn.response_class = lambda sock, *args, **kwargs: http.client.HTTPResponse(patience, *args, **kwargs)
        return conn

    def _send(self, method: str, path: str, body: Any = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = bearer(self.api_key)
        conn = None
        try:
            conn = self._connection()
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            raise ServerGone(f"orion serve at {self.info.url} did not answer: {exc}",
                             hint="start it again with 'orion serve', or pass --local") from exc
        if response.status >= 400:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException):  # the error's body was lost: its status says enough
                raw = b""
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
