"""The HTTP face of ``orion serve`` (Starlette): OpenAI-compatible routes (``/v1``), Ollama's API
(``/api``, its shapes in :mod:`.ollama`, NDJSON streams and ``{"error": "..."}`` errors), orion's
own management API (``/api/orion``) and the memory dashboard (``/``, its files in :mod:`.dashboard`).

Thin routes: each parses its request (:mod:`.openai`, :mod:`.ollama`), calls the state or the core,
and answers.
Every error is ``{"error": {"message", "type", "param", "code"}}`` with the status of its row in
:mod:`.http_errors` (400 bad input, 401 key, 404 unknown model or route, 409 in use, 413 too large,
422 not a GGUF, 503 queue full with Retry-After, 507 does not fit); a 5xx never carries a traceback
(the console gets it). Model work runs in worker threads; streams are server-sent events.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import traceback
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from .. import __version__
from ..errors import InvalidValue, ModelInUse, OrionError
from . import openai, openai_embeddings, token_arrays
from .http_errors import APIError, Unauthorized, api_error, internal_error
from .http_limits import STOPPED, answered_by_connection
from .metrics import metrics_text, ps_document
from .openai import Asked, model_name, optional_text
from .openai_replies import Reply, embeddings_document, sse
from .route_helpers import (
    error_response,
    generate_whole,
    generation_to_stream,
    in_thread,
    ollama_error,
    read_json,
    stream_error,
)
from .routes_ollama import OllamaRoutes
from .state import ServerState
from .streaming import LeasedStream, stream_from_thread

# The format a chat or completion's prompt was built in (orion_cli.messages.chat_format: "gguf", a
# fallback such as "gemma" or "transcript" for a model without a chat template, "none" for plain
# text), also in the response's "timings" as "chat_template": clients ignore both.
CHAT_TEMPLATE_HEADER = "x-orion-chat-template"
# How many of an embeddings request's inputs were cut to the encoder's window (also usage.truncated_inputs).
TRUNCATED_HEADER = "x-orion-truncated-inputs"


class Routes(OllamaRoutes):
    """The route handlers over one :class:`ServerState`."""

    def __init__(self, state: ServerState, log: Callable[[str], None], *, auth: bool = False) -> None:
        self.state = state
        self.log = log
        self.auth = auth  # whether the API key is required (the dashboard asks for it then)

    # ------------------------------------------------------------ health, models

    async def health(self, request: Request) -> Response:
        """Names itself and its home: a client takes a server for its own only when both match
        (a port reused by another program, or another home's server, is not it). Says too what
        clients may name beyond the registered models (a client keeps a file of its own in its own
        process when ``allow_paths`` is false)."""
        import os

        from .discovery import SERVICE, resolved_home

        access = self.state.access
        return JSONResponse({"status": "ok", "service": SERVICE, "home": resolved_home(), "version": __version__,
                             "pid": os.getpid(), "uptime_s": round(time.time() - self.state.started, 1),
                             "allow_paths": access.allow_paths, "allow_fetch": access.allow_fetch,
                             "auth": self.auth})

    # ------------------------------------------------------------ the dashboard (.dashboard)

    async def dashboard(self, request: Request) -> Response:
        from .dashboard import FILES, HEADERS, PAGE, static_file

        name = request.path_params.get("name", PAGE)
        body = static_file(name)
        if body is None:
            raise APIError(404, f"no dashboard file {name[:100]!r}", code="not_found",
                           hint="the dashboard is at / (or /dashboard)")
        return Response(body, media_type=FILES[name], headers=HEADERS)

    async def history(self, request: Request) -> Response:
        return JSONResponse(self.state.history.document())

    async def models(self, request: Request) -> Response:
        """What this server has (:meth:`~.state.ServerState.models_here`), not what it could fetch."""
        return JSONResponse({"object": "list", "data": await in_thread(self.state.models_here)})

    async def model(self, request: Request) -> Response:
        """One model of :meth:`models`, as OpenAI's ``GET /v1/models/{id}`` answers (``client.models.retrieve``)."""
        name = openai.checked_name(request.path_params["id"])
        found = await in_thread(self.state.model_here, name)
        if found is None:
            raise APIError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found",
                           hint=openai.MODELS_HINT)
        return JSONResponse(found)

    # ------------------------------------------------------------ chat and completions

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def generate(self, request: Request, *, chat: bool) -> Response:
        # what a generation gets when its server's grace period is over (its model unloaded under it)
        from ..engine.decoder import ModelUnloaded

        doc = await read_json(request)
        name = model_name(doc)
        asked = Asked.parse(doc, chat=chat)
        served = await in_thread(self.state.llm, name)
        request.state.model = served.name  # labelled once it is a model served here (bounded)
        options = openai.generation_options(doc, served.n_ctx, chat=chat)
        reply = Reply(chat, name, logprobs=options.get("logprobs"), prompt=asked.prompt)
        lease = self.state.lease(served)
        if not asked.stream:
            gen = await generate_whole(self.state, lease, lambda model: asked.generation(model, options),
                                       request.receive)
            timings = gen.timings.to_dict() | {"chat_template": gen.chat_format}
            if asked.tools is not None:
                content, calls = asked.tool_answer(gen.text)
                return JSONResponse(reply.tool_answer(content, calls, gen.finish_reason, self._count(served, gen),
                                                      timings), headers={CHAT_TEMPLATE_HEADER: gen.chat_format})
            return JSONResponse(reply.whole(gen.text, gen.finish_reason, self._count(served, gen), timings,
                                            gen.new_records()),
                                headers={CHAT_TEMPLATE_HEADER: gen.chat_format})
        # Streaming: from here the lease is given back exactly once, whatever happens (the response holds it
        # once it exists).
        gen = await generation_to_stream(lease, lambda model: asked.generation(model, options))

        def work(emit, cancel):
            for doc in reply.start():
                emit(doc)
            finish = gen.finish_reason
            try:
                if asked.tools is not None:  # a call or a reply: known once the answer is whole
                    content, calls = asked.tool_answer(gen.run(cancel))
                    emit(reply.tool_piece(content, calls))
                    finish = "tool_calls" if calls else gen.finish_reason
                else:
                    for piece in gen.pieces(cancel):
                        emit(reply.text_piece(piece, gen.new_records() if gen.records is not None else None))
                    finish = gen.finish_reason
            except ModelUnloaded as exc:
                if self.state.stopping.is_set():
                    raise OrionError(STOPPED, hint="send the request again once the server is back") from exc
                raise
            usage = self._count(served, gen)
            emit(reply.end(finish))
            if asked.include_usage:
                emit(reply.usage_chunk(usage, gen.timings.to_dict() | {"chat_template": gen.chat_format}))

        cancel = threading.Event()  # set when the response ends, however: the worker stops at its next token
        return LeasedStream(lease, self._events(stream_from_thread(work, lease, cancel)), cancel=cancel,
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                                     CHAT_TEMPLATE_HEADER: gen.chat_format})

    def _count(self, served, gen) -> dict:
        usage = gen.usage()
        self.state.metrics.add_tokens(served.name, usage["prompt_tokens"], usage["completion_tokens"],
                                      gen.timings.gen_tok_s)
        return usage

    def _count_embedding(self, served, n_tokens: int, started: float) -> None:
        """An embedding request's tokens, and its speed since ``started`` (time.perf_counter)."""
        seconds = time.perf_counter() - started
        self.state.metrics.add_tokens(served.model_id, n_tokens, 0, n_tokens / seconds if seconds > 0 else None)

    async def _events(self, items):
        """Server-sent events of a stream's documents; an error in the middle is an error event."""
        async for item in items:
            if isinstance(item, BaseException):
                err = stream_error(item, self.log)
                yield sse({"error": err.body()["error"] | {"status": err.status}})
                break
            yield sse(item)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ embeddings

    async def embeddings(self, request: Request) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        fmt = openai_embeddings.encoding_format(doc)
        inputs = openai_embeddings.embedding_inputs(doc.get("input"))
        served = await in_thread(self.state.encoder, name, optional_text(doc, "prefer_id"))
        request.state.model = served.name
        openai_embeddings.check_dimensions(doc, served.model_id, served.dim)
        texts = await in_thread(token_arrays.as_text, inputs)  # OpenAI's token arrays are cl100k ids, not the encoder's
        started = time.perf_counter()
        vectors, n_tokens, truncated = await in_thread(self.state.shared_encoder(served).embed, texts)
        self._count_embedding(served, n_tokens, started)
        # named as the client named it (served.model_id, minilm@q8_0, is what /api/orion/encoder says)
        return JSONResponse(embeddings_document(vectors, fmt, name, n_tokens, truncated),
                            headers={TRUNCATED_HEADER: str(truncated)})

    # ------------------------------------------------------------ orion's own: encoders and chunks

    async def encoder_info(self, request: Request) -> Response:
        doc = await read_json(request)
        served = await in_thread(self.state.encoder, optional_text(doc, "model"), optional_text(doc, "prefer_id"))
        request.state.model = served.name
        return JSONResponse({"id": served.model_id, "dim": served.dim, "max_tokens": served.n_ctx,
                             "file": str(served.path), "type": served.file_type})

    async def chunk(self, request: Request) -> Response:
        doc = await read_json(request)
        text = doc.get("text")
        if not isinstance(text, str):
            raise APIError(400, "'text' must be a string", param="text")
        served = await in_thread(self.state.encoder, optional_text(doc, "model"), optional_text(doc, "prefer_id"))
        request.state.model = served.name
        chunks = await in_thread(self.state.shared_encoder(served).chunks, text)
        return JSONResponse({"model": served.model_id, "chunks": [
            [c.text, c.start_byte, c.end_byte, c.start_line, c.end_line] for c in chunks]})

    # ------------------------------------------------------------ management

    async def ps(self, request: Request) -> Response:
        return JSONResponse(await in_thread(ps_document, self.state))

    async def load(self, request: Request) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        embedding = openai.boolean(doc, "embedding")
        pin = doc.get("pin")
        if pin is not None and not isinstance(pin, bool):
            raise APIError(400, "'pin' must be true or false", param="pin")
        keep_alive: Any = "default"
        if "keep_alive" in doc:
            from ..units import parse_keep_alive

            try:
                keep_alive = parse_keep_alive(doc["keep_alive"])
            except InvalidValue as exc:
                raise APIError(400, exc.message, param="keep_alive", hint=exc.hint) from exc

        served = await in_thread(self.state.resolve_any, name, embedding)
        request.state.model = served.name
        await in_thread(lambda: self.state.manager.load(served.request, pin=pin, keep_alive_s=keep_alive))
        return JSONResponse({"model": name, "key": served.request.key, "kind": served.kind, "loaded": True})

    async def unload(self, request: Request) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        key = self.state.loaded_key(name)
        if key is None:
            raise APIError(404, f"{name} is not loaded", code="model_not_loaded", param="model",
                           hint="'orion ps' lists the loaded models")
        served = self.state.by_key(key)
        request.state.model = served.name if served is not None else key
        try:
            await in_thread(self.state.manager.unload, key)
        except ModelInUse as exc:  # said with the name the client used
            raise ModelInUse(f"{name} is in use", hint=exc.hint) from exc
        return JSONResponse({"model": name, "unloaded": True})

    async def events(self, request: Request) -> Response:
        """Server-sent events of the manager's events from now on; ``?since=SEQ``: the kept ones after that
        sequence number first (``since=0``: all those kept)."""
        state = self.state
        since = request.query_params.get("since")
        if since is not None and not (since.isascii() and since.isdigit() and len(since) <= 18):
            raise APIError(400, f"'since' must be an event's sequence number (0 or more), not {since[:40]!r}",
                           param="since")
        queue = state.events.subscribe(None if since is None else int(since))

        async def body():
            try:
                yield ": orion events\n\n"
                while not state.stopping.is_set():
                    try:
                        doc = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
                    yield sse(doc)
            finally:
                state.events.unsubscribe(queue)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(metrics_text(self.state), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ Ollama's API (its shapes: .ollama)


# ---------------------------------------------------------------- the app


def create_app(state: ServerState, *, api_key: str | None = None,
               log: Callable[[str], None] = lambda line: None) -> Starlette:
    """The Starlette application over ``state``."""
    routes = Routes(state, log, auth=api_key is not None)

    def route(path: str, fn, method: str, *, auth: bool = True, answer=error_response) -> Route:
        """``fn`` behind the API key, its errors answered as JSON (by ``answer``: OpenAI's shape, or
        Ollama's on its routes), each answer counted."""
        async def handler(request: Request) -> Response:
            start = time.perf_counter()
            request.state.model = "-"
            try:
                if auth and api_key is not None and not _authorized(request, api_key):
                    raise Unauthorized("missing or wrong API key", hint="send 'Authorization: Bearer KEY'")
                response = await fn(request)
            except ClientDisconnect:  # gone while it sent its request: no one to answer, nothing to log
                response = Response(status_code=499)
            except APIError as exc:
                response = answer(exc)
            except OrionError as exc:
                response = answer(api_error(exc))
            except Exception as exc:  # a bug: the console gets the traceback, the client one line
                log(f"internal error on {path}: {traceback.format_exc()}")
                response = answer(internal_error(exc))
            # the connection may have answered it itself (408: its body came too slowly; 503: the server
            # stopped), the route then seeing its client gone: counted as what the client got
            status = answered_by_connection(request.scope) or response.status_code
            state.metrics.request(path, request.state.model, status, time.perf_counter() - start)
            return response

        return Route(path, handler, methods=[method])

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed"))
        err = APIError(404, f"no route {request.url.path}", code="not_found",
                       hint="the OpenAI routes are under /v1, Ollama's under /api, orion's own under /api/orion")
        ollamas = request.url.path.startswith("/api/") and not request.url.path.startswith("/api/orion/")
        return ollama_error(err) if ollamas else error_response(err)

    table = [
        route("/health", routes.health, "GET", auth=False),
        # the page and its files hold no data: served without the key, which the page asks for
        route("/", routes.dashboard, "GET", auth=False),
        route("/dashboard", routes.dashboard, "GET", auth=False),
        route("/dashboard/{name}", routes.dashboard, "GET", auth=False),
        route("/api/orion/history", routes.history, "GET"),
        route("/v1/models", routes.models, "GET"),
        route("/v1/models/{id:path}", routes.model, "GET"),
        route("/v1/chat/completions", routes.chat_completions, "POST"),
        route("/v1/completions", routes.completions, "POST"),
        route("/v1/embeddings", routes.embeddings, "POST"),
        route("/api/orion/encoder", routes.encoder_info, "POST"),
        route("/api/orion/chunk", routes.chunk, "POST"),
        route("/api/orion/ps", routes.ps, "GET"),
        route("/api/orion/load", routes.load, "POST"),
        route("/api/orion/unload", routes.unload, "POST"),
        route("/api/orion/events", routes.events, "GET"),
        route("/metrics", routes.metrics, "GET"),
        # Ollama's API, in its shapes (errors too): for the tools that speak only it
        *[route(path, fn, method, answer=ollama_error) for path, fn, method in (
            ("/api/version", routes.ollama_version, "GET"),
            ("/api/tags", routes.ollama_tags, "GET"),
            ("/api/show", routes.ollama_show, "POST"),
            ("/api/chat", routes.ollama_chat, "POST"),
            ("/api/generate", routes.ollama_generate, "POST"),
            ("/api/embed", routes.ollama_embed, "POST"),
            ("/api/embeddings", routes.ollama_embeddings, "POST"),
            ("/api/ps", routes.ollama_ps, "GET"),
            ("/api/pull", routes.ollama_pull, "POST"),
            ("/api/delete", routes.ollama_delete, "DELETE"),
        )],
    ]
    return Starlette(routes=table, exception_handlers={404: not_found, 405: not_found})


def _authorized(request: Request, api_key: str) -> bool:
    """Whether the request carries ``Authorization: Bearer KEY``, compared as UTF-8 bytes: Starlette
    reads a header as latin-1 (one character a byte), so its bytes are the client's own; a key of
    any characters (``clé-ünïcode-🔑``) matches itself, and nothing else does."""
    header = request.headers.get("authorization", "").encode("latin-1")
    scheme, _, token = header.partition(b" ")
    # bytes, so strip() takes only ASCII blanks: str.strip() would cut U+00A0 and U+0085, which are
    # the last byte of some UTF-8 characters read as latin-1 ('à' is C3 A0)
    expected = api_key.encode("utf-8", "surrogateescape").strip(b" \t")  # a key from a non-UTF-8 environment
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(b" \t"), expected)
