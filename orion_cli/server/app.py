"""The HTTP face of ``orion serve`` (Starlette): OpenAI-compatible routes and the management API.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the status that fits
(400 bad input, 401 key, 404 unknown model or route, 409 in use, 413 too large, 503 queue full
with Retry-After, 507 does not fit); a 5xx never carries a traceback (the console gets it).
Model work runs in worker threads; streams are server-sent events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
import traceback
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import DoesNotFit, InvalidValue, ModelInUse, NotAGGUF, NotFound, OrionError, WrongModelKind
from .state import QueueFull, ServerState

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 2048
DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered as an OpenAI-shaped JSON body."""

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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: OrionError) -> APIError:
    """An orion error as the HTTP error that fits it."""
    if isinstance(exc, QueueFull):
        return APIError(503, exc.message, type_="server_busy", code="queue_full", hint=exc.hint,
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, NotFound):
        return APIError(404, exc.message, code="model_not_found", param="model", hint=exc.hint)
    if isinstance(exc, DoesNotFit):
        return APIError(507, exc.message, type_="insufficient_memory", code="model_does_not_fit", hint=exc.hint)
    if isinstance(exc, NotAGGUF):
        return APIError(422, exc.message, code="invalid_model", param="model", hint=exc.hint)
    if isinstance(exc, InvalidValue):
        return APIError(400, exc.message, hint=exc.hint)
    return APIError(500, exc.message, type_="server_error", hint=exc.hint)


# ---------------------------------------------------------------- request bodies


async def read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                           code="request_too_large")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(doc, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return doc


def number(doc: dict, key: str, default, lo: float, hi: float, *, integer: bool = False):
    value = doc.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} from {lo:g} to {hi:g}, not {value!r}", param=key,
                       code="invalid_value")
    return value


def model_name(doc: dict) -> str:
    name = doc.get("model")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "'model' is required: an orion model name, org/repo or a GGUF path", param="model",
                       code="missing_model")
    return name.strip()


def optional_text(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise APIError(400, f"'{key}' must be a non-empty string", param=key, code="invalid_value")
    return value


def stop_strings(doc: dict) -> list[str]:
    stop = doc.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop",
                       code="invalid_value")
    return stops


def generation_options(doc: dict, n_ctx: int) -> dict:
    if number(doc, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "'n' must be 1", param="n")
    return {
        "max_tokens": number(doc, "max_tokens", DEFAULT_MAX_TOKENS, 1, n_ctx, integer=True),
        "temperature": float(number(doc, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(number(doc, "top_p", 1.0, 0.0, 1.0)),
        "seed": number(doc, "seed", None, -(2**63), 2**63 - 1, integer=True),
    }


def chat_parts(doc: dict) -> tuple[str | None, list[dict], str]:
    """(system, history, last user message) from OpenAI ``messages``."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] needs a role: system, user or assistant", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict)]
            if any(p.get("type") != "text" for p in parts) or len(parts) != len(content):
                raise APIError(400, f"messages[{i}]: only text content is served here",
                               hint="images work with 'orion run MODEL --image' (in-process)", param=f"messages[{i}]")
            content = "".join(str(p.get("text", "")) for p in parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    system = None
    if out[0]["role"] == "system":
        system = out.pop(0)["content"]
    if not out or out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return system, out[:-1], out[-1]["content"]


# ---------------------------------------------------------------- generation


class Generation:
    """One generation in a worker thread: pieces out, stop strings, usage and timings."""

    def __init__(self, model, prompt: str, options: dict, stops: list[str], *, chat: bool | None,
                 system: str | None = None, history: list[dict] | None = None) -> None:
        from ..engine import Timings

        self.model, self.prompt, self.options, self.stops = model, prompt, options, stops
        self.chat, self.system, self.history = chat, system, history or []
        self.timings = Timings()
        self.text = ""
        self.finish_reason = "stop"
        self.completion_tokens = 0
        self._tokens: tuple[list[int], list[str]] | None = None

    def _prompt_tokens(self) -> tuple[list[int], list[str]]:
        """The prompt's tokens and the template's stop strings (computed once)."""
        if self._tokens is None:
            from ..engine import prompt_tokens

            self._tokens = prompt_tokens(self.model, self.prompt, system=self.system, history=self.history,
                                         chat=self.chat)
        return self._tokens

    def check_fits(self) -> None:
        """Raise the prompt-too-long error now (before a stream's first byte) rather than mid-stream."""
        from ..engine import prompt_too_long

        n_tokens = len(self._prompt_tokens()[0])
        if n_tokens >= self.model.spec.n_ctx:
            raise prompt_too_long(n_tokens, self.model.spec.n_ctx)

    def pieces(self, cancel: threading.Event) -> Any:
        """Yield text as it is generated (stop strings cut, held back while they may be starting)."""
        if self.model.spec.parallel > 1:  # decoded together with the model's other requests
            tokens, template_stops = self._prompt_tokens()
            self.stops = self.stops + [s for s in template_stops if s not in self.stops]
            stream = self.model.decoder().generate(tokens, timings=self.timings, **self.options)
        else:
            stream = self.model.generate(self.prompt, system=self.system, history=self.history,
                                         timings=self.timings, chat=self.chat, **self.options)
        hold = max((len(s) for s in self.stops), default=1) - 1
        pending = ""
        stopped = False  # by a stop string
        try:
            for piece in stream:
                if cancel.is_set():
                    return
                pending += piece
                cut = min((pending.find(s) for s in self.stops if s in pending), default=-1)
                if cut >= 0:
                    pending, stopped = pending[:cut], True
                    break
                if len(pending) > hold:
                    out, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
                    self.text += out
                    yield out
        finally:
            stream.close()
        if pending:
            self.text += pending
            yield pending
        self.completion_tokens = len(self.model.tokenize(self.text, special=False)) if self.text else 0
        if not stopped and self.completion_tokens >= self.options["max_tokens"]:
            self.finish_reason = "length"

    def usage(self) -> dict:
        return {"prompt_tokens": self.timings.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.timings.prompt_tokens + self.completion_tokens}


def _sse(doc: Any) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def stream_from_thread(work: Callable[[Callable[[Any], None], threading.Event], None]):
    """Run ``work(emit, cancel)`` in a thread and yield what it emits; a client that goes away
    sets ``cancel`` (the model is released after its next token)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def emit(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            work(emit, cancel)
        except BaseException as exc:  # the stream has started: an error event, then the end
            emit(exc)
        emit(done)

    threading.Thread(target=run, name="orion-stream", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            yield item
    finally:
        cancel.set()


# ---------------------------------------------------------------- the app


def create_app(state: ServerState, *, api_key: str | None = None,
               log: Callable[[str], None] = lambda line: None) -> Starlette:
    """The Starlette application over ``state``."""
    from anyio import to_thread

    def route(name: str, *, auth: bool = True):
        def wrap(fn):
            async def handler(request: Request) -> Response:
                start = time.perf_counter()
                request.state.model = "-"
                try:
                    if auth and api_key is not None and not _authorized(request, api_key):
                        raise APIError(401, "missing or wrong API key", type_="authentication_error",
                                       code="invalid_api_key", hint="send 'Authorization: Bearer KEY'")
                    response = await fn(request)
                except APIError as exc:
                    response = exc.response()
                except OrionError as exc:
                    response = api_error(exc).response()
                except Exception as exc:  # a bug: the console gets the traceback, the client one line
                    log(f"internal error on {name}: {traceback.format_exc()}")
                    response = APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                        type_="server_error").response()
                state.metrics.request(name, request.state.model, response.status_code, time.perf_counter() - start)
                return response
            return handler
        return wrap

    async def in_thread(fn, *args):
        return await to_thread.run_sync(fn, *args)

    # ------------------------------------------------------------ health, models

    @route("/health", auth=False)
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__, "pid": _pid(),
                             "uptime_s": round(time.time() - state.started, 1)})

    @route("/v1/models")
    async def models(request: Request) -> Response:
        def listing():
            from ..models import Registry, catalog

            names = dict.fromkeys([*Registry().all(), *catalog()])
            created = int(state.started)
            return [{"id": n, "object": "model", "created": created, "owned_by": "orion"} for n in names]

        return JSONResponse({"object": "list", "data": await in_thread(listing)})

    # ------------------------------------------------------------ chat and completions

    async def generate(request: Request, *, chat_route: bool) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        request.state.model = name
        stream = bool(doc.get("stream", False))
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage")) if stream else False
        stops = stop_strings(doc)
        if chat_route:
            system, history, prompt = chat_parts(doc)
        else:
            prompt = doc.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string", param="prompt")
            system, history = None, []
        served = await in_thread(state.llm, name)
        options = generation_options(doc, served.n_ctx)
        ident = ("chatcmpl-" if chat_route else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        kind = "chat.completion" if chat_route else "text_completion"

        def make(model) -> Generation:
            return Generation(model, prompt, options, stops, chat=None if chat_route else False,
                              system=system, history=history)

        def finish(gen: Generation) -> dict:
            usage = gen.usage()
            state.metrics.add_tokens(served.name, usage["prompt_tokens"], usage["completion_tokens"])
            return usage

        if not stream:
            def run():
                with state.sharing(served) as model:
                    gen = make(model)
                    for _ in gen.pieces(threading.Event()):
                        pass
                    return gen, finish(gen)

            gen, usage = await in_thread(run)
            choice = ({"index": 0, "message": {"role": "assistant", "content": gen.text},
                       "finish_reason": gen.finish_reason} if chat_route else
                      {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason})
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": name,
                                 "choices": [choice], "usage": usage, "timings": gen.timings.to_dict()})

        # Streaming: take the queue place and load the model before answering, so a full queue
        # or a model that does not fit is a real HTTP error, not a broken stream.
        holder = state.sharing(served)
        model = await in_thread(holder.__enter__)
        gen = make(model)
        try:
            await in_thread(gen.check_fits)
        except BaseException:
            holder.__exit__(None, None, None)
            raise

        def chunk(delta_or_text, finish_reason=None) -> dict:
            if chat_route:
                body = {"index": 0, "delta": delta_or_text, "finish_reason": finish_reason}
            else:
                body = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
            return {"id": ident, "object": f"{kind}.chunk" if chat_route else kind, "created": created,
                    "model": name, "choices": [body]}

        def work(emit, cancel):
            try:
                if chat_route:
                    emit(chunk({"role": "assistant", "content": ""}))
                for piece in gen.pieces(cancel):
                    emit(chunk({"content": piece} if chat_route else piece))
                usage = finish(gen)
                emit(chunk({} if chat_route else "", gen.finish_reason))
                if include_usage:
                    emit({"id": ident, "object": f"{kind}.chunk" if chat_route else kind, "created": created,
                          "model": name, "choices": [], "usage": usage, "timings": gen.timings.to_dict()})
            finally:
                holder.__exit__(None, None, None)

        async def body():
            async for item in stream_from_thread(work):
                if isinstance(item, BaseException):
                    err = api_error(item) if isinstance(item, OrionError) else APIError(
                        500, f"internal error ({type(item).__name__})", type_="server_error")
                    if not isinstance(item, OrionError):
                        log("internal error in a stream: " + "".join(traceback.format_exception(item)))
                    yield _sse({"error": err.body()["error"] | {"status": err.status}})
                    break
                yield _sse(item)
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @route("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat_route=True)

    @route("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat_route=False)

    # ------------------------------------------------------------ embeddings

    @route("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        request.state.model = name
        fmt = doc.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        inputs = embedding_inputs(doc.get("input"))
        served = await in_thread(state.encoder, name, optional_text(doc, "prefer_id"))
        if doc.get("dimensions") is not None and doc.get("dimensions") != _dim(served):
            raise APIError(400, f"{served.model_id} makes {_dim(served)}-dimensional vectors; 'dimensions' cannot "
                                "change that", param="dimensions")

        def run():
            with state.manager.use(served.request) as model:
                sequences, truncated = tokenize_inputs(model, inputs, served.n_ctx)
                future = state.batcher(served).submit(sequences)
                return future.result(), sequences, truncated

        vectors, sequences, truncated = await in_thread(run)
        n_tokens = sum(len(s) for s in sequences)
        state.metrics.add_tokens(served.model_id, n_tokens, 0)
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": served.model_id,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens,
                                       "truncated_inputs": truncated}})

    # ------------------------------------------------------------ orion's own: encoders and chunks

    @route("/api/encoder")
    async def encoder_info(request: Request) -> Response:
        doc = await read_json(request)
        served = await in_thread(state.encoder, optional_text(doc, "model"), optional_text(doc, "prefer_id"))
        request.state.model = served.name
        return JSONResponse({"id": served.model_id, "dim": _dim(served), "max_tokens": served.n_ctx,
                             "file": str(served.path), "type": served.file_type})

    @route("/api/chunk")
    async def chunk_route(request: Request) -> Response:
        doc = await read_json(request)
        text = doc.get("text")
        if not isinstance(text, str):
            raise APIError(400, "'text' must be a string", param="text")
        served = await in_thread(state.encoder, optional_text(doc, "model"), optional_text(doc, "prefer_id"))
        request.state.model = served.name

        def run():
            from ..embeddings import Encoder

            with state.manager.use(served.request) as model:
                enc = Encoder(model, model_id=served.model_id, max_tokens=served.n_ctx)
                return [[c.text, c.start_byte, c.end_byte, c.start_line, c.end_line] for c in enc.chunks(text)]

        return JSONResponse({"model": served.model_id, "chunks": await in_thread(run)})

    # ------------------------------------------------------------ management

    @route("/api/ps")
    async def ps(request: Request) -> Response:
        return JSONResponse(await in_thread(ps_document, state))

    @route("/api/load")
    async def load(request: Request) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        request.state.model = name
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

        def run():
            served = resolve_any(state, name, bool(doc.get("embedding")))
            state.manager.load(served.request, pin=pin, keep_alive_s=keep_alive)
            return served

        served = await in_thread(run)
        return JSONResponse({"model": name, "key": served.request.key, "kind": served.kind, "loaded": True})

    @route("/api/unload")
    async def unload(request: Request) -> Response:
        doc = await read_json(request)
        name = model_name(doc)
        request.state.model = name
        key = _loaded_key(state, name)
        if key is None:
            raise APIError(404, f"{name} is not loaded", code="model_not_loaded", param="model",
                           hint="'orion ps' lists the loaded models")
        try:
            await in_thread(state.manager.unload, key)
        except ModelInUse as exc:
            raise APIError(409, f"{name} is in use", code="model_in_use",
                           hint="it is unloaded once its requests finish (keep-alive), or try again") from exc
        return JSONResponse({"model": name, "unloaded": True})

    @route("/api/events")
    async def events(request: Request) -> Response:
        queue = state.events.subscribe()

        async def body():
            try:
                yield ": orion events\n\n"
                while not state.stopping.is_set():
                    try:
                        doc = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
                    yield _sse(doc)
            finally:
                state.events.unsubscribe(queue)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @route("/metrics")
    async def metrics(request: Request) -> Response:
        queues = {}
        for key, depth in state.queue_depths().items():
            served = state.by_key(key)
            queues[served.name if served else key] = depth
        memory, steps = {}, {}
        for status in state.manager.status():
            served = state.by_key(status.key)
            name = served.name if served else status.name
            memory[name] = status.estimate_bytes
            model = state.manager.peek(status.key)
            decoder = getattr(model, "_decoder", None)
            if served is not None and served.kind == "llm":
                steps[name] = decoder.steps if decoder is not None else 0
        text = state.metrics.render(queues=queues, memory=memory, events=dict(state.events.counts),
                                    decode_steps=steps)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(404, f"no route {request.url.path}", code="not_found",
                        hint="the OpenAI routes are under /v1; orion's own under /api").response()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/api/encoder", encoder_info, methods=["POST"]),
        Route("/api/chunk", chunk_route, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/load", load, methods=["POST"]),
        Route("/api/unload", unload, methods=["POST"]),
        Route("/api/events", events, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _pid() -> int:
    import os

    return os.getpid()


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def _dim(served) -> int:
    from ..gguf_header import read_local_header

    return read_local_header(served.path).n_embd


def embedding_inputs(value: Any) -> list[str | list[int]]:
    """A string, a list of strings, a token array or a list of token arrays, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a string, a list of strings or token arrays (non-empty)", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"'input' has {len(value)} items; the most in one request is {MAX_EMBEDDING_INPUTS}",
                       param="input")
    for i, item in enumerate(value):
        ok = isinstance(item, str) or (isinstance(item, list) and item and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item))
        if not ok:
            raise APIError(400, f"input[{i}] must be a string or a non-empty list of token ids", param=f"input[{i}]")
    return value


def tokenize_inputs(model, inputs: list, window: int) -> tuple[list[list[int]], int]:
    """Token sequences within the encoder's window (texts truncated as sentence-transformers
    does, keeping [SEP]; token arrays cut at the window); and how many were truncated."""
    n_vocab = model._llm.n_vocab()
    sequences, truncated = [], 0
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = model.tokenize(item)
            if len(ids) > window:
                ids = ids[: window - 1] + [ids[-1]]
                truncated += 1
        else:
            if any(t < 0 or t >= n_vocab for t in item):
                raise APIError(400, f"input[{i}] has token ids outside the vocabulary (0..{n_vocab - 1})",
                               param=f"input[{i}]")
            ids = list(item)
            if len(ids) > window:
                ids = ids[:window]
                truncated += 1
        sequences.append(ids)
    return sequences, truncated


def resolve_any(state: ServerState, name: str, embedding: bool):
    """An LLM, or an encoder when the name is one (or ``embedding`` says so)."""
    if embedding:
        return state.encoder(name)
    try:
        return state.llm(name)
    except WrongModelKind:
        return state.encoder(name)


def _loaded_key(state: ServerState, name: str) -> str | None:
    loaded = {s.key: s for s in state.manager.status()}
    for key, status in loaded.items():
        served = state.by_key(key)
        if name in (status.name, key) or (served is not None and name in (served.name, served.model_id)):
            return key
    served = state.by_key(name)
    return served.request.key if served is not None and served.request.key in loaded else None


def ps_document(state: ServerState) -> dict:
    """What ``GET /api/ps`` answers: each loaded model, memory against the budget, pressure, events."""
    from pathlib import Path

    from ..budget import pressure_of
    from ..device import memory_now

    depths = state.queue_depths()
    models, used = [], 0
    for s in state.manager.status():
        served = state.by_key(s.key)
        used += s.estimate_bytes
        models.append({
            "name": served.name if served else s.name, "key": s.key, "kind": served.kind if served else "",
            "file": str(served.path) if served else "", "type": served.file_type if served else "",
            "model_id": served.model_id if served else "",
            "estimate_bytes": s.estimate_bytes, "measured_bytes": served.measured_bytes if served else None,
            "gpu_bytes": s.gpu_bytes,
            "remote_bytes": s.remote_bytes,
            "loaded_for_s": round(s.loaded_for_s, 1), "idle_s": round(s.idle_s, 1),
            "keep_alive_s": s.keep_alive_s,
            "expires_in_s": None if s.expires_in_s is None else round(s.expires_in_s, 1),
            "pinned": s.pinned, "in_use": s.in_use, "users": s.users, "queue_depth": depths.get(s.key, 0),
        })
    strategy = state.strategy
    pressure = pressure_of(memory_now(), strategy.pressure_high, strategy.pressure_critical)
    return {"models": models, "budget_bytes": strategy.memory_budget_bytes, "used_bytes": used,
            "gpu_budget_bytes": state.manager.gpu_budget_bytes,
            "gpu_used_bytes": sum(s.gpu_bytes for s in state.manager.status()),
            "max_models": strategy.max_models, "pressure": pressure,
            "events": list(state.events.latest)[-10:]}
