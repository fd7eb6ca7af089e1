"""What every route module shares: errors as responses, model work in a worker thread, the body read."""

from __future__ import annotations

import threading

from starlette.requests import Request
from starlette.responses import JSONResponse

from . import ollama, openai
from .http_errors import APIError
from .http_limits import STOPPED, shutting_down
from .streaming import run_until_gone


def stream_error(item: BaseException, log) -> APIError:
    """What a client is told of an error in the middle of a stream: an OrionError as its API error, any
    other as a 500 without its traceback (which goes to the server's log)."""
    import traceback

    from ..errors import OrionError
    from .http_errors import api_error

    if isinstance(item, OrionError):
        return api_error(item)
    log("internal error in a stream: " + "".join(traceback.format_exception(item)))
    return APIError(500, f"internal error ({type(item).__name__})", type_="server_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def ollama_error(err: APIError) -> JSONResponse:
    """An error in Ollama's shape, ``{"error": "..."}``, with its status."""
    return JSONResponse(ollama.error_body(err), status_code=err.status, headers=err.headers)


async def in_thread(fn, *args):
    from anyio import to_thread

    return await to_thread.run_sync(fn, *args)


async def read_json(request: Request) -> dict:
    return await openai.read_json(request.stream(), request.headers.get("content-length"))


async def generate_whole(state, lease, make, receive):
    """The whole of a generation on ``lease`` (``make(model)`` builds it), in a worker thread: a
    client gone stops it at its next token; a model unloaded because the server stops is its 503."""
    from ..engine.decoder import ModelUnloaded

    cancel = threading.Event()

    def run():
        with lease as model:
            gen = make(model)
            gen.run(cancel)
            return gen

    try:
        return await run_until_gone(run, receive, cancel)
    except ModelUnloaded as exc:
        if state.stopping.is_set():
            raise shutting_down(STOPPED) from exc
        raise


async def generation_to_stream(lease, make):
    """A generation to stream, its queue place taken, its model loaded and its prompt checked first,
    so that a full queue, a model that does not fit or a prompt too long is an HTTP error, not a broken
    stream. On failure the lease is given back; from here the response holds it."""
    try:
        model = await in_thread(lease.acquire)
        gen = make(model)
        await in_thread(gen.check_fits)
        return gen
    except BaseException:
        lease.release()
        raise
