"""What every route module shares: errors as responses, model work in a worker thread, the body read."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from . import ollama, openai
from .http_errors import APIError


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
