"""ONE table between orion's errors and HTTP, read both ways: the app answers an error with its row's
status, OpenAI ``type`` and ``code``; the client (:mod:`.client`) raises the row's class for that
``code``, so a command that goes through a server ends with the exit code it has in-process (a file
that is not a GGUF: exit 7 both ways). Two hand-kept inverse tables drifted apart (422 came back as
a usage error, exit 2); one cannot.

Every error body is ``{"error": {"message", "type", "param", "code"[, "hint"]}}``; a 5xx never
carries a traceback. Standard library only: the CLI's client imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (
    ConfigError,
    DoesNotFit,
    EngineFault,
    InvalidValue,
    ModelInUse,
    NetworkError,
    NotAGGUF,
    NotFound,
    OrionError,
    WrongModelKind,
)


class QueueFull(OrionError):
    """A model's request queue is full: try again shortly."""

    retry_after_s = 1

    def __init__(self, model: str, depth: int, retry_after_s: int = 1) -> None:
        super().__init__(f"{model} has {depth} requests queued, the most it takes",
                         hint=f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Unauthorized(OrionError):
    """The request's API key is missing or wrong."""


@dataclass(frozen=True)
class Row:
    cls: type[OrionError]
    status: int
    type: str
    code: str
    param: str | None = None


# An error is answered by the first row its class is a subclass of: the more specific rows first.
# Each code names one class; a status may have several (400: a wrong kind of model, any bad value).
TABLE: tuple[Row, ...] = (
    Row(QueueFull, 503, "server_busy", "queue_full"),
    Row(Unauthorized, 401, "authentication_error", "invalid_api_key"),
    Row(ModelInUse, 409, "invalid_request_error", "model_in_use", "model"),
    Row(WrongModelKind, 400, "invalid_request_error", "wrong_model_kind", "model"),
    Row(NotAGGUF, 422, "invalid_request_error", "invalid_model", "model"),
    Row(NotFound, 404, "invalid_request_error", "model_not_found", "model"),
    Row(DoesNotFit, 507, "insufficient_memory", "model_does_not_fit"),
    Row(InvalidValue, 400, "invalid_request_error", "invalid_value"),
    Row(ConfigError, 500, "server_error", "config_error"),
    Row(NetworkError, 502, "server_error", "network_error"),
    Row(EngineFault, 500, "server_error", "engine_crash"),
    Row(OrionError, 500, "server_error", "server_error"),
)
BY_CODE = {row.code: row for row in TABLE}
# A body without a known code (a request the routes refused while parsing it: 'invalid_json',
# 'missing_model', 'request_too_large', 'model_not_loaded'...; another server): by its status, the
# most general class the table has for it.
BY_STATUS: dict[int, type[OrionError]] = {413: InvalidValue}
for _row in reversed(TABLE):
    BY_STATUS.setdefault(_row.status, _row.cls)
del _row


def row_of(exc: OrionError) -> Row:
    return next(row for row in TABLE if isinstance(exc, row.cls))


class APIError(Exception):
    """An error answered as an OpenAI-shaped JSON body (its status said by the route: parsing a
    request, an unknown route); orion's own errors become one through :func:`api_error`."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, hint: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.hint, self.headers = hint, headers

    def body(self) -> dict:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.hint:
            err["hint"] = self.hint
        return {"error": err}


def api_error(exc: OrionError) -> APIError:
    """An orion error as the HTTP error of its row."""
    row = row_of(exc)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    return APIError(row.status, exc.message, type_=row.type, param=row.param, code=row.code, hint=exc.hint,
                    headers=headers)


def internal_error(exc: BaseException) -> APIError:
    """A bug, said in one line (the console gets the traceback)."""
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    type_="server_error")


def error_from_body(status: int, err: dict | None, message: str, *, retry_after: str | None = None) -> OrionError:
    """The orion error a server's error body stands for: the class of its ``code`` (else of its
    status), with the server's message and hint."""
    err = err if isinstance(err, dict) else {}
    row = BY_CODE.get(str(err.get("code")))
    cls = row.cls if row is not None else BY_STATUS.get(status, OrionError)
    hint = err.get("hint") if isinstance(err.get("hint"), str) else None
    exc = cls.__new__(cls)  # the server's words, whatever the class's own constructor takes
    OrionError.__init__(exc, message, hint=hint)
    if isinstance(exc, QueueFull):
        exc.retry_after_s = int(retry_after) if retry_after and retry_after.isdigit() else QueueFull.retry_after_s
    return exc
