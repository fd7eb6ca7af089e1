"""How long a connection may take over its request, and how many there may be (uvicorn's h11).

uvicorn bounds an idle kept-alive connection (``timeout_keep_alive``) but not a request: a client that
sends half of its headers, or a ``Content-Length`` it never completes, held its connection (and its
task, waiting in ``receive``) for ever, and delayed SIGTERM by the whole grace period. Here, one
timer per connection, after the phase the request is in (read from h11's states):

- **waiting for a request** (a new connection, or the last response sent): closed without a word
  after ``idle_s`` with no byte (uvicorn's keep-alive timer, armed at once on a new connection too;
  ``header_s`` if shorter); the headers must be in within ``header_s`` of that start, else ``408``
  and the connection closed;
- **receiving its body**: all of it within ``body_s`` of the headers, else ``408`` and closed (the
  route, waiting in ``receive``, sees ``http.disconnect``: a ``ClientDisconnect``, answered to no one);
- **being answered**: no limit here (a generation takes what it takes; ``max_tokens`` bounds it).

When the server stops, a request that has not fully arrived (part of its headers, or of its body)
was not taken on: ``503`` at once and closed, as a new connection would be refused, instead of
holding the shutdown for its grace period. A ``408`` or ``503`` here is the routes' JSON error, and
so is the ``503`` to a request past the connection limit (uvicorn's own is plain text). A request
answered here while its route works on it is counted in ``/metrics`` with the status its client got
(:func:`answered_by_connection`), not as a client that left (499).

:func:`limits_from_env` reads ``ORION_HTTP_HEADER_TIMEOUT``, ``ORION_HTTP_BODY_TIMEOUT``,
``ORION_HTTP_IDLE_TIMEOUT``, ``ORION_HTTP_MAX_CONNECTIONS`` and ``ORION_SERVE_GRACE``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace

from ..errors import InvalidValue
from .http_errors import APIError

HEADER_TIMEOUT_S = 10.0  # a request's headers (curl's or a client library's arrive in one packet)
BODY_TIMEOUT_S = 30.0  # the 8 MiB body limit in 30 s is 280 KB/s: any link a model server is used over
IDLE_TIMEOUT_S = 5.0  # uvicorn's own default keep-alive
MAX_CONNECTIONS = 1000  # uvicorn answers 503 to requests past it; at most half the open-file limit
GRACE_S = 10.0  # in-flight requests' time to finish after SIGINT/SIGTERM


@dataclass(frozen=True)
class HTTPLimits:
    header_s: float = HEADER_TIMEOUT_S
    body_s: float = BODY_TIMEOUT_S
    idle_s: float = IDLE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    grace_s: float = GRACE_S


ENV_VARS = {"header_s": "ORION_HTTP_HEADER_TIMEOUT", "body_s": "ORION_HTTP_BODY_TIMEOUT",
            "idle_s": "ORION_HTTP_IDLE_TIMEOUT", "max_connections": "ORION_HTTP_MAX_CONNECTIONS",
            "grace_s": "ORION_SERVE_GRACE"}
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$", re.IGNORECASE)
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0}


def parse_seconds(text: str, what: str) -> float:
    """``"10"``, ``"10s"``, ``"500ms"``, ``"2m"``: seconds above zero, at most a day."""
    text = str(text)
    match = _SECONDS.match(text)
    seconds = float(match.group(1)) * _UNIT[match.group(2) and match.group(2).lower()] if match else -1.0
    if not 0 < seconds <= 86400:
        raise InvalidValue(f"{what} {text[:40]!r} must be a duration above 0, at most a day",
                           hint="seconds (10), or with a unit: 500ms, 10s, 2m")
    return seconds


def limits_from_env(limits: HTTPLimits, environ=os.environ) -> HTTPLimits:
    """``limits`` with what the environment sets (``ORION_HTTP_*``, ``ORION_SERVE_GRACE``)."""
    changes: dict = {}
    for key, var in ENV_VARS.items():
        text = environ.get(var, "").strip()
        if not text:
            continue
        if key == "max_connections":
            if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
                raise InvalidValue(f"{var} {text!r} is not a count of connections", hint="for example 1000")
            changes[key] = int(text)
        else:
            changes[key] = parse_seconds(text, var)
    return replace(limits, **changes)


def connection_limit(wanted: int) -> int:
    """``wanted``, at most half the soft limit on open files (each connection is a file; the models, the
    engine and the listening socket need some): past it accept() fails and asyncio stops accepting."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return wanted
    return max(1, min(wanted, soft // 2))


def shutting_down(what: str = "the server is shutting down") -> APIError:
    """The answer to a request the server stopped for (503: another server may take it)."""
    return APIError(503, what, type_="server_error", code="server_shutting_down",
                    hint="send the request again once the server is back")


def too_many_connections(limit: int) -> APIError:
    """The answer to a request past the connection limit (503: it may be sent again shortly)."""
    return APIError(503, f"the server has {limit} connections open, the most it takes", type_="server_busy",
                    code="too_many_connections", hint="retry after 1 s, or close idle connections",
                    headers={"Retry-After": "1"})


def _answer(error: APIError) -> bytes:
    """A whole HTTP response of ``error``, after which the connection closes."""
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[error.status]
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


# Where a connection notes the status it answered a request with itself (in the request's ASGI
# ``scope["state"]``, the dict Starlette's ``request.state`` is made of: shared by the route).
ANSWERED = "orion.answered_by_connection"


def answered_by_connection(scope) -> int | None:
    """The status this module's protocol answered the request of ``scope`` with while its route still
    worked on it (408, 503), or None: the route's own answer is the one its client gets."""
    state = scope.get("state")
    return state.get(ANSWERED) if isinstance(state, dict) else None


def _json_reply(error: APIError):
    """An ASGI app that answers ``error`` as the routes answer it, and closes the connection."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]

    async def reply(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return reply


def _late(what: str, seconds: float) -> APIError:
    return APIError(408, f"the request's {what} did not arrive within {seconds:g} s", code="request_timeout",
                    hint=f"send the whole {'request' if what == 'headers' else 'body'} at once")


def protocol_class(limits: HTTPLimits) -> type:
    """uvicorn's h11 protocol with ``limits``' header and body deadlines (its ``http=``: always h11,
    whether httptools is installed or not)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._phase: str | None = None  # "request" (waiting for one), "body", or None (being answered)
            self._deadline = None  # the phase's timer
            # the connection limit, checked here (uvicorn's own check answers in plain text): the app
            # of each request is the routes' app, or the JSON 503 when too many are open
            self._limit, self.limit_concurrency = self.limit_concurrency, None
            if self._limit is not None:
                self.app = self._limited(self.app, _json_reply(too_many_connections(self._limit)))

        def _limited(self, app, refuse):
            """``app`` while fewer than the limit are open, else ``refuse`` (as uvicorn decides it, where
            its tasks did not count this request's own yet)."""
            async def limited(scope, receive, send) -> None:
                if len(self.connections) >= self._limit or len(self.tasks) > self._limit:
                    self.logger.warning("Exceeded concurrency limit.")
                    await refuse(scope, receive, send)
                else:
                    await app(scope, receive, send)

            return limited

        # ------------------------------------------------------------ the phases

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # uvicorn arms its keep-alive timer only after a response: a new connection that never sent a
            # byte stayed open for ever
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
            self._follow()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            self._phase = None
            super().connection_lost(exc)

        def _follow(self) -> None:
            """Set the phase from h11's states, and its timer when it changed."""
            if self.transport is None or self.transport.is_closing():
                phase = None
            elif self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                phase = "request"
            elif self.conn.their_state is h11.SEND_BODY:
                phase = "body"
            else:
                phase = None
            if phase == self._phase:
                return
            self._stop_timer()
            self._phase = phase
            if phase is not None:
                self._deadline = self.loop.call_later(limits.header_s if phase == "request" else limits.body_s,
                                                      self._expired)

        def _partial(self) -> bool:
            """Part of the awaited request has arrived (bytes h11 holds, not yet a whole head)."""
            return self._phase == "request" and bool(self.conn.trailing_data[0])

        def _stop_timer(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            if self._phase == "request" and not self._partial():  # idle: as uvicorn's keep-alive closes it
                self.timeout_keep_alive_handler()
            elif self._phase == "request":
                self._refuse(_late("headers", limits.header_s))
            else:
                self._refuse(_late("body", limits.body_s), self.cycle)

        def _refuse(self, error: APIError | None, cycle=None) -> None:
            """Answer ``error`` (when no response has started) and close; the route of ``cycle`` (waiting
            for its body, or for its work) gets ``http.disconnect`` now, so its own answer goes nowhere,
            and finds the status its client got in its scope (:func:`answered_by_connection`)."""
            if error is not None and (cycle is None or not cycle.response_started):
                self.transport.write(_answer(error))
                if cycle is not None:
                    cycle.scope.setdefault("state", {})[ANSWERED] = error.status
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self._stop_timer()
            self._phase = None
            self.transport.close()

        # ------------------------------------------------------------ the server stops

        def shutdown(self) -> None:
            started = self._phase == "body" and self.cycle is not None and self.cycle.response_started
            if (self._phase == "body" and not started) or self._partial():
                self._refuse(shutting_down(), self.cycle if self._phase == "body" else None)
                return
            super().shutdown()

        def give_up(self, *, streams: bool) -> None:
            """The grace period is over: a request still being answered is answered 503 now (its route,
            waiting for its work, sees its client gone and stops it); with ``streams``, a response
            already under way (a stream that did not end with its error event) is cut."""
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None or cycle.response_complete:
                return
            if not cycle.response_started:
                self._refuse(shutting_down(STOPPED), cycle)
            elif streams:
                self._refuse(None, cycle)

    return TimedH11Protocol


STOPPED = "the server is shutting down; this request was stopped before its end"


def give_up(connections, *, streams: bool) -> None:
    """:meth:`give_up` on each of uvicorn's connections (``server_state.connections``) that has it."""
    for connection in list(connections):
        if hasattr(connection, "give_up"):
            connection.give_up(streams=streams)
