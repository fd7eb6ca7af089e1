"""Ollama's API on ``orion serve`` (``/api``: tags, show, chat, generate, embed, embeddings, ps, version,
pull, delete): the routes, over the same core as the OpenAI ones (:class:`orion_cli.generation.Generation`,
the state's leases), in Ollama's shapes (:mod:`.ollama`) with NDJSON streams and ``{"error": "..."}``
errors. :class:`OllamaRoutes` is a part of :class:`.app.Routes`, which gives it ``state``, ``log``,
``_count`` and ``_count_embedding``."""

from __future__ import annotations

import threading
import time

from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    Response,
    StreamingResponse,
)

from .. import __version__
from ..errors import ModelInUse, OrionError
from . import ollama, openai, openai_embeddings
from .http_errors import APIError
from .http_limits import STOPPED
from .route_helpers import generate_whole, generation_to_stream, in_thread, read_json, stream_error
from .streaming import LeasedStream, stream_from_thread


class OllamaRoutes:
    async def _ollama_model(self, doc: dict) -> str:
        """The orion name for the model an Ollama request names (``hf.co/OWNER/REPO:QUANT`` included)."""
        from ..models import Registry

        name = ollama.model_name(doc)
        if ollama.hub_name(name) is None:
            return name
        return await in_thread(lambda: ollama.orion_name(name, Registry().all()))

    def _facts(self, path, sha256: str | None = None):
        """(the GGUF header or None for a folder, a digest in hex as Ollama's) of a model file: its
        sha256 from the Hub where it was fetched, else the digest of its header bytes and size (read
        once a process); no digest ("") for a folder that was not fetched, rather than one made up."""
        from pathlib import Path

        from ..errors import OrionError
        from ..gguf_header import read_local_header

        path = Path(path)
        if path.is_dir():
            return None, sha256 or ""
        try:
            header = read_local_header(path)
        except OrionError:  # gone or damaged since it was registered: listed without its details
            return None, sha256 or ""
        if sha256 is None:
            from ..engine.dryrun import header_digest

            sha256 = header_digest(path, header.data_offset)
        return header, sha256

    async def ollama_tags(self, request: Request) -> Response:
        def listing():
            from ..models import Registry

            rows = []
            for model in Registry().all().values():
                header, digest = self._facts(model.path, model.sha256)
                rows.append(ollama.tag_row(model, header, digest))
            return {"models": rows}

        return JSONResponse(await in_thread(listing))

    async def ollama_show(self, request: Request) -> Response:
        doc = await read_json(request)
        name = await self._ollama_model(doc)

        def show():
            from ..models import LocalModel, Registry

            allowed = self.state.access.check(name)
            if allowed.how == "registered":
                model = Registry().get(allowed.name)
            elif allowed.how == "path":
                from pathlib import Path

                model = LocalModel(name, "llm", name, "path", size_bytes=Path(name).stat().st_size)
            else:  # a Hub name not here: shown once it is pulled
                from .access import refusal

                raise refusal(name)
            header, _ = self._facts(model.path, model.sha256)
            if header is not None and not model.file_type:
                from dataclasses import replace

                model = replace(model, file_type=header.file_type)
            kinds = {"llm": ["completion"], "vision": ["completion", "vision"], "encoder": ["embedding"]}
            return ollama.show_document(model, header, kinds.get(model.kind, []))

        return JSONResponse(await in_thread(show))

    async def ollama_chat(self, request: Request) -> Response:
        return await self._ollama_generate(request, chat=True)

    async def ollama_generate(self, request: Request) -> Response:
        return await self._ollama_generate(request, chat=False)

    async def _ollama_generate(self, request: Request, *, chat: bool) -> Response:
        """/api/chat and /api/generate: the same Generation as /v1, Ollama's options and lines.
        The model is loaded first (``keep_alive`` given to the manager), so ``load_duration`` is
        the load's own time; an empty prompt only loads it (keep_alive 0: unloads it), as Ollama does."""
        from ..engine.decoder import ModelUnloaded

        started = time.perf_counter()
        doc = await read_json(request)
        shown = ollama.model_name(doc)
        name = await self._ollama_model(doc)
        asked = ollama.Asked.parse_chat(doc) if chat else ollama.Asked.parse_generate(doc)
        keep = ollama.keep_alive(doc)
        served = await in_thread(self.state.llm, name)
        request.state.model = served.name
        options, stops = ollama.generation_options(doc, served.n_ctx)
        reply = ollama.Reply(chat, shown)
        if asked.empty and keep == 0:
            key = self.state.loaded_key(served.name)
            if key is not None:
                await in_thread(self.state.manager.unload, key)
            return JSONResponse(reply.end("", "unload", {}))
        loading = time.perf_counter()
        await in_thread(lambda: self.state.manager.load(served.request, keep_alive_s=keep))
        load_s = time.perf_counter() - loading
        if asked.empty:
            return JSONResponse(reply.end("", "load", {"total_duration": int((time.perf_counter() - started) * 1e9),
                                                        "load_duration": int(load_s * 1e9)}))
        lease = self.state.lease(served)
        if not asked.stream:
            gen = await generate_whole(self.state, lease, lambda model: asked.generation(model, options, stops),
                                       request.receive)
            self._count(served, gen)
            return JSONResponse(reply.end(gen.text, gen.finish_reason, ollama.counters(gen, started, load_s)))
        gen = await generation_to_stream(lease, lambda model: asked.generation(model, options, stops))

        def work(emit, cancel):
            try:
                for piece in gen.pieces(cancel):
                    emit(reply.piece(piece))
            except ModelUnloaded as exc:
                if self.state.stopping.is_set():
                    raise OrionError(STOPPED, hint="send the request again once the server is back") from exc
                raise
            self._count(served, gen)
            emit(reply.end("", gen.finish_reason, ollama.counters(gen, started, load_s)))

        cancel = threading.Event()
        return LeasedStream(lease, self._lines(stream_from_thread(work, lease, cancel)), cancel=cancel,
                            media_type="application/x-ndjson", headers={"Cache-Control": "no-cache",
                                                                        "X-Accel-Buffering": "no"})

    async def _lines(self, items):
        """NDJSON lines of a stream's documents; an error in the middle is Ollama's ``{"error"}`` line."""
        async for item in items:
            if isinstance(item, BaseException):
                err = stream_error(item, self.log)
                yield ollama.line(ollama.error_body(err))
                break
            yield ollama.line(item)

    async def ollama_embed(self, request: Request) -> Response:
        return await self._ollama_embed(request, legacy=False)

    async def ollama_embeddings(self, request: Request) -> Response:
        return await self._ollama_embed(request, legacy=True)

    async def _ollama_embed(self, request: Request, *, legacy: bool) -> Response:
        """/api/embed (``input``: a string or a list; ``embeddings``) and the older /api/embeddings
        (``prompt``; ``embedding``), through the shared encoder as /v1/embeddings."""
        started = time.perf_counter()
        doc = await read_json(request)
        shown = ollama.model_name(doc)
        name = await self._ollama_model(doc)
        inputs = ollama.embed_inputs(doc, "prompt" if legacy else "input")
        truncate = openai.boolean(doc, "truncate", True)
        keep = ollama.keep_alive(doc)
        served = await in_thread(self.state.encoder, name, None)
        request.state.model = served.name
        ollama.refuse_embed_options(doc, served.n_ctx)
        openai_embeddings.check_dimensions(doc, served.model_id, served.dim)
        loading = time.perf_counter()
        await in_thread(lambda: self.state.manager.load(served.request, keep_alive_s=keep))
        load_s = time.perf_counter() - loading
        embedding = time.perf_counter()
        vectors, n_tokens, truncated = await in_thread(self.state.shared_encoder(served).embed, inputs)
        self._count_embedding(served, n_tokens, embedding)
        if truncated and not truncate:
            raise ollama.bad("truncate", f"{truncated} of the inputs are longer than {served.model_id}'s window of "
                             f"{served.n_ctx} tokens", hint="send shorter inputs, or leave truncate out (true)")
        if legacy:
            return JSONResponse({"embedding": vectors[0].tolist()})
        return JSONResponse({"model": shown, "embeddings": [v.tolist() for v in vectors],
                             "total_duration": int((time.perf_counter() - started) * 1e9),
                             "load_duration": int(load_s * 1e9), "prompt_eval_count": n_tokens})

    async def ollama_ps(self, request: Request) -> Response:
        def rows():
            out = []
            for status in self.state.manager.status():
                served = self.state.by_key(status.key)
                if served is None:  # loading for a name not yet remembered
                    continue
                header, digest = self._facts(served.path)
                out.append(ollama.ps_row(served, status, header, digest))
            return {"models": out}

        return JSONResponse(await in_thread(rows))

    async def ollama_version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def ollama_pull(self, request: Request) -> Response:
        """A model fetched as ``orion fetch`` picks it (only where the server allows clients to
        fetch), with Ollama's status lines while it downloads."""
        from .access import PullRefused

        doc = await read_json(request)
        name = ollama.model_name(doc)
        stream = openai.boolean(doc, "stream", True)
        if openai.boolean(doc, "insecure"):
            raise ollama.bad("insecure", "orion does not fetch over insecure connections", hint="leave it out")
        hub = ollama.hub_name(name)
        text, quant = (hub.repo, hub.quant) if hub is not None else (name, None)
        if quant:
            from ..errors import InvalidValue
            from ..fetch import normalise_quant

            try:
                normalise_quant(quant)
            except InvalidValue as exc:
                raise ollama.bad("model", exc.message, hint=exc.hint) from exc
        if not self.state.access.allow_fetch:  # said as an HTTP error, before a stream starts
            try:
                self.state.access.pull(text, self.state.strategy, quant=quant)
            except PullRefused as exc:
                raise APIError(403, exc.message, code="fetch_not_allowed", hint=exc.hint) from exc

        def work(emit, cancel):
            emit({"status": "pulling manifest"})
            shown = {"file": "", "total": 0, "done": 0, "said": -1}

            def on_file(filename: str, total: int, have: int) -> None:
                shown.update(file=filename, total=total, done=have, said=-1)
                emit({"status": f"pulling {filename}", "total": total, "completed": have})

            def on_bytes(n: int) -> None:
                if cancel.is_set():
                    raise OrionError("the pull was given up: its client went away")
                shown["done"] += n
                percent = shown["done"] * 100 // max(1, shown["total"])
                if percent != shown["said"]:  # a line a percent, not one a chunk
                    shown["said"] = percent
                    emit({"status": f"pulling {shown['file']}", "total": shown["total"], "completed": shown["done"]})

            model = self.state.access.pull(text, self.state.strategy, quant=quant, on_file=on_file, on_bytes=on_bytes)
            emit({"status": f"registered as {model.name}"})
            emit({"status": "success"})

        if stream:
            return StreamingResponse(self._lines(stream_from_thread(work)), media_type="application/x-ndjson")
        await in_thread(lambda: work(lambda doc: None, threading.Event()))
        return JSONResponse({"status": "success"})

    async def ollama_delete(self, request: Request) -> Response:
        """A registered model forgotten (a fetched one's files deleted, as ``orion rm``), unloaded
        first; only where clients may change what is here (``--allow-fetch``)."""
        from ..models import remove_model

        doc = await read_json(request)
        name = await self._ollama_model(doc)
        if not self.state.access.allow_fetch:
            raise APIError(403, f"this server does not delete models for clients ({name!r} was asked)",
                           code="delete_not_allowed",
                           hint="on the server's machine: orion rm MODEL; or start it with --allow-fetch")
        key = self.state.loaded_key(name)
        if key is not None:
            try:
                await in_thread(self.state.manager.unload, key)
            except ModelInUse as exc:
                raise ModelInUse(f"{name} is in use", hint=exc.hint) from exc
        await in_thread(remove_model, name)
        return JSONResponse({})
