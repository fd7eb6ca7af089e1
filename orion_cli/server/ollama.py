"""Ollama's wire format (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``...): requests
parsed and checked, and the documents and NDJSON lines Ollama's clients read.

Many local tools speak only Ollama's API. The routes (:mod:`.app`) parse with these, call the same
core objects the OpenAI routes call (:class:`orion_cli.generation.Generation`, the shared encoder),
and answer with these documents. An option orion cannot honour is refused with a 400 that names it,
never accepted and ignored: a client asking for ``top_k`` or ``format: json`` would otherwise get an
answer it did not ask for and not know it. Errors are Ollama's shape, ``{"error": "..."}`` (the
hint, what to do, after a semicolon). No model work here and no web framework.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .http_errors import APIError
from .openai import _shown, boolean, checked_name
from .openai_embeddings import embedding_inputs

# Ollama's own defaults where a request leaves them out (its Modelfile defaults): num_predict -1 is
# "until the model stops or the context is full".
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9

# the options honoured, and where each goes; every other key of Options is refused by name
HONOURED = ("temperature", "top_p", "seed", "num_predict", "stop", "num_ctx")


def error_body(err: APIError) -> dict:
    """Ollama's error shape: one string (the hint, what to do, after it)."""
    return {"error": f"{err.message}; {err.hint}" if err.hint else err.message}


def line(doc: dict) -> str:
    """One NDJSON line."""
    return json.dumps(doc, separators=(",", ":")) + "\n"


def now_iso(at: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if at is None else at, timezone.utc).isoformat().replace("+00:00", "Z")


def bad(key: str, message: str, hint: str | None = None) -> APIError:
    return APIError(400, message, param=key, code="invalid_value", hint=hint)


# ---------------------------------------------------------------- names


def model_name(doc: dict, key: str = "model") -> str:
    """The model a request names (Ollama's clients also send ``name``), without Ollama's default tag
    ``:latest`` (orion's names have no tags; ``hf.co/OWNER/REPO:QUANT`` keeps its quantization)."""
    name = doc.get(key)
    if name is None and key == "model":
        name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, f"'{key}' is required: the name of a model this server has (GET /api/tags lists them)",
                       param=key, code="missing_model")
    name = name.strip()
    if name.endswith(":latest"):
        name = name[: -len(":latest")]
    return checked_name(name, key)


@dataclass(frozen=True)
class HubName:
    """``hf.co/OWNER/REPO[:QUANT]`` (or ``huggingface.co/...``): a Hub repo and the quantization asked."""

    repo: str
    quant: str | None


def hub_name(name: str) -> HubName | None:
    for prefix in ("hf.co/", "huggingface.co/", "https://hf.co/", "https://huggingface.co/"):
        if name.lower().startswith(prefix):
            rest = name[len(prefix):]
            repo, _, quant = rest.partition(":")
            return HubName(repo.strip("/"), quant or None)
    return None


def orion_name(name: str, registered: dict) -> str:
    """The name orion resolves for an Ollama name: ``hf.co/OWNER/REPO:QUANT`` is the model of that
    repo (and type) registered here, else ``OWNER/REPO`` (the server's access policy decides)."""
    hub = hub_name(name)
    if hub is None:
        return name
    here = [m for m in registered.values() if m.repo and m.repo.lower() == hub.repo.lower()
            and (hub.quant is None or (m.file_type or "").upper() == hub.quant.upper())]
    return here[0].name if len(here) == 1 else hub.repo


# ---------------------------------------------------------------- options


def _number(options: dict, key: str, allowed):
    value = options[key]
    if not allowed.contains(value):
        raise bad(f"options.{key}", f"'options.{key}' must be {allowed.describe()}, not {_shown(value)}")
    return int(value) if allowed.integer else float(value)


def generation_options(doc: dict, n_ctx: int) -> tuple[dict, list[str]]:
    """Ollama ``options`` as orion's generation options and stop strings; any option orion cannot
    honour is a 400 naming it. ``num_predict`` -1 (Ollama's default) and -2 run to the context's end;
    ``seed`` -1 is a random one, as left out;
    ``num_ctx`` is the server's context (``orion serve --ctx``), which one request cannot change."""
    from .. import limits

    options = doc.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad("options", f"'options' must be an object, not {_shown(options)}")
    refused = [k for k, v in options.items() if k not in HONOURED and v is not None]
    if refused:
        raise bad(f"options.{refused[0]}", f"orion does not support the option{'s' if len(refused) > 1 else ''} "
                  f"{', '.join(repr(k) for k in refused)}",
                  hint=f"leave {'them' if len(refused) > 1 else 'it'} out; orion honours {', '.join(HONOURED)}")
    out = {"max_tokens": n_ctx, "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "seed": None}
    given = {k: v for k, v in options.items() if v is not None}
    if "temperature" in given:
        out["temperature"] = _number(given, "temperature", limits.TEMPERATURE)
    if "top_p" in given:
        out["top_p"] = _number(given, "top_p", limits.TOP_P)
    if "seed" in given and given["seed"] != -1:  # -1: llama.cpp's and Ollama's "a random seed"
        out["seed"] = _number(given, "seed", limits.SEED)
    if "num_predict" in given:
        value = given["num_predict"]
        if value in (-1, -2) and not isinstance(value, bool):
            out["max_tokens"] = n_ctx
        else:
            out["max_tokens"] = _number(given, "num_predict", limits.max_tokens_range(n_ctx))
    if "num_ctx" in given:
        value = given["num_ctx"]
        if isinstance(value, bool) or not isinstance(value, int) or value != n_ctx:
            raise bad("options.num_ctx", f"'options.num_ctx' is {_shown(value)}, but this server's context is "
                      f"{n_ctx} tokens for every request", hint=f"leave it out, or send {n_ctx}; the context is "
                      "set when the server starts (orion serve --ctx)")
    stops = given.get("stop", [])
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("options.stop", "'options.stop' must be a list of non-empty strings")
    fmt = doc.get("format")
    if fmt == "json":  # Ollama's JSON mode: any JSON object, as a llama.cpp grammar
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt:  # a JSON schema the answer follows
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": None, "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad("format", f"'format' must be \"json\" or a JSON schema (an object), not {_shown(fmt)}")
    return out, list(stops)


def keep_alive(doc: dict) -> Any:
    """``keep_alive`` as the manager takes it: seconds, None (never unloaded) or ``"default"``."""
    if doc.get("keep_alive") is None:
        return "default"
    from ..errors import InvalidValue
    from ..units import parse_keep_alive

    try:
        return parse_keep_alive(doc["keep_alive"])
    except InvalidValue as exc:
        raise bad("keep_alive", exc.message, hint=exc.hint) from exc


def refuse_fields(doc: dict, fields: dict[str, str]) -> None:
    """A 400 for the first of ``fields`` (name -> why and what to do) the request sets to something
    orion cannot honour (absent, null, false, "" and [] ask for nothing)."""
    for key, hint in fields.items():
        value = doc.get(key)
        if value not in (None, False, "", [], {}):
            raise bad(key, f"orion does not support '{key}' on this route", hint=hint)


# what /api/chat and /api/generate cannot honour, and what to do instead
COMMON_REFUSED = {
    "think": "leave it out (or false): orion does not separate a model's thinking",
    "logprobs": "leave it out: orion does not return log probabilities",
    "top_logprobs": "leave it out: orion does not return log probabilities",
}
GENERATE_REFUSED = COMMON_REFUSED | {
    "template": "leave it out: orion applies the model's own chat template (or raw: true for none)",
    "context": "send the conversation again (orion returns no context tokens); or use /api/chat",
    "suffix": "leave it out: orion does not fill in the middle",
    "images": "images work with 'orion run MODEL --image' (in-process)",
}
CHAT_REFUSED = COMMON_REFUSED | {"tools": "leave it out: orion does not call tools"}


@dataclass
class Asked:
    """What an /api/chat or /api/generate request asks for (checked before any model is resolved)."""

    chat: bool
    prompt: str
    system: str | None
    history: list[dict]
    raw: bool
    stream: bool

    @property
    def empty(self) -> bool:
        """Nothing to generate: Ollama loads the model (or, with keep_alive 0, unloads it)."""
        return not self.prompt and not self.history and self.system is None

    @classmethod
    def parse_chat(cls, doc: dict) -> Asked:
        refuse_fields(doc, CHAT_REFUSED)
        messages = doc.get("messages")
        if messages is None:
            messages = []
        if not isinstance(messages, list):
            raise bad("messages", "'messages' must be a list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise bad(f"messages[{i}]", f"messages[{i}] needs a role: system, user or assistant")
            refuse_fields(m, {"images": "images work with 'orion run MODEL --image' (in-process)",
                              "tool_calls": "orion does not call tools", "thinking": "orion does not think apart"})
            content = m.get("content", "")
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
            out.append({"role": m["role"], "content": content})
        system = None
        if out and out[0]["role"] == "system":
            system = out.pop(0)["content"]
        if not out and system is None:
            return cls(True, "", None, [], False, boolean(doc, "stream", True))
        if not out or out[-1]["role"] != "user":
            raise bad("messages", "the last message must be the user's")
        if any(m["role"] == "system" for m in out):
            raise bad("messages", "a system message comes first only")
        return cls(True, out[-1]["content"], system, out[:-1], False, boolean(doc, "stream", True))

    @classmethod
    def parse_generate(cls, doc: dict) -> Asked:
        refuse_fields(doc, GENERATE_REFUSED)
        prompt = doc.get("prompt") or ""
        system = doc.get("system")
        if not isinstance(prompt, str):
            raise bad("prompt", "'prompt' must be a string")
        if system is not None and not isinstance(system, str):
            raise bad("system", "'system' must be a string")
        raw = boolean(doc, "raw")
        if raw and system:
            raise bad("system", "'system' has no place in a raw prompt", hint="put it in the prompt, or drop raw")
        return cls(False, prompt, system or None, [], raw, boolean(doc, "stream", True))

    def generation(self, model, options: dict, stops: list[str]):
        """The core's generation: a chat, a templated prompt, or (raw) the prompt as it is."""
        from ..generation import Generation

        return Generation(model, self.prompt, options, stops, chat=False if self.raw else None,
                          system=self.system, history=self.history)


# ---------------------------------------------------------------- answers


@dataclass
class Reply:
    """The documents of one /api/chat or /api/generate answer."""

    chat: bool
    model: str

    def _doc(self, text: str) -> dict:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}
        return {"model": self.model, "created_at": now_iso()} | body

    def piece(self, text: str) -> dict:
        return self._doc(text) | {"done": False}

    def end(self, text: str, done_reason: str, counters: dict) -> dict:
        return self._doc(text) | {"done": True, "done_reason": done_reason} | counters


def counters(gen, started: float, load_s: float) -> dict:
    """Ollama's counters, in nanoseconds, of a generation (``started``: the request's perf_counter).
    The decoder's timings count the first token with the prompt (its time is the prompt's: it comes
    from the prompt's last logits) and the rest as the generation's: ``eval_count`` is every token
    generated, the first included, as Ollama counts them."""
    t = gen.timings
    generated = t.gen_tokens + 1 if (t.gen_tokens or gen.text) else 0
    return {"total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": int(load_s * 1e9),
            "prompt_eval_count": t.prompt_tokens, "prompt_eval_duration": int(t.prompt_s * 1e9),
            "eval_count": generated, "eval_duration": int(t.gen_s * 1e9)}


def embed_inputs(doc: dict, key: str) -> list[str]:
    """/api/embed's ``input`` (a string or a list of strings) or /api/embeddings' ``prompt``."""
    value = doc.get(key)
    if key == "prompt":
        if not isinstance(value, str):
            raise bad("prompt", "'prompt' must be a string")
        return [value]
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise bad("input", "'input' must be a string or a list of strings")
    try:
        return embedding_inputs(value)
    except APIError as exc:
        raise bad("input", "'input' must be a string or a non-empty list of strings") from exc


def refuse_embed_options(doc: dict, n_ctx: int) -> None:
    """/api/embed takes no generation options; ``num_ctx`` only as the encoder's own window."""
    options = doc.get("options") or {}
    if not isinstance(options, dict):
        raise bad("options", f"'options' must be an object, not {_shown(options)}")
    for key, value in options.items():
        if value is None:
            continue
        if key == "num_ctx" and value == n_ctx and not isinstance(value, bool):
            continue
        raise bad(f"options.{key}", f"orion does not support the option {key!r} for embeddings",
                  hint=f"leave it out (the encoder's window is {n_ctx} tokens)")


# ---------------------------------------------------------------- what is here


def details(header, kind: str, file_type: str) -> dict:
    """Ollama's ``details`` of a model (``header``: its GGUF header; None for an encoder folder, whose
    family is then its kind and its parameter size unknown)."""
    if header is None:
        return {"parent_model": "", "format": file_type or "safetensors", "family": kind, "families": [kind],
                "parameter_size": "", "quantization_level": file_type or ""}
    return {"parent_model": "", "format": "gguf", "family": header.architecture, "families": [header.architecture],
            "parameter_size": parameter_size(header.n_params), "quantization_level": header.file_type}


def parameter_size(n: int) -> str:
    """Ollama's way of saying a parameter count: 268.10M, 7.2B."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.2f}K" if n >= 1e3 else str(n)


def model_info(header) -> dict:
    """The GGUF header's metadata as Ollama's ``model_info``: every scalar and short list; the long
    arrays (the vocabulary, its merges) that the header reader counted but did not keep are null,
    as Ollama sends them unless asked to be verbose."""
    from ..gguf_header import ArrayInfo

    info = {k: (None if isinstance(v, ArrayInfo) else v) for k, v in header.metadata.items()
            if k != "tokenizer.chat_template"}
    info["general.parameter_count"] = header.n_params
    return info


def modified_at(model) -> str:
    return model.added or now_iso(0)


def tag_row(model, header, digest: str) -> dict:
    return {"name": model.name, "model": model.name, "modified_at": modified_at(model), "size": model.size_bytes,
            "digest": digest, "details": details(header, model.kind, model.file_type)}


def show_document(model, header, capabilities: list[str]) -> dict:
    template = (header.get("tokenizer.chat_template") or "") if header is not None else ""
    return {"modelfile": "", "parameters": "", "template": template if isinstance(template, str) else "",
            "details": details(header, model.kind, model.file_type),
            "model_info": model_info(header) if header is not None else {},
            "capabilities": capabilities, "modified_at": modified_at(model)}


# Ollama's expiry for a model never unloaded for inactivity: now + the longest Go duration (~292
# years); clients parse expires_at as a timestamp and some cannot take null
NEVER_S = (2**63 - 1) / 1e9


def ps_row(served, status, header, digest: str) -> dict:
    """One loaded model as Ollama's /api/ps shows it. ``expires_at``: when its keep-alive unloads
    it; one in use counts from now (its keep-alive starts when it is let go); pinned or without a
    keep-alive, Ollama's never."""
    if status.expires_in_s is not None:
        expires_in = status.expires_in_s
    elif status.pinned or status.keep_alive_s is None:
        expires_in = NEVER_S
    else:
        expires_in = status.keep_alive_s
    expires = now_iso(time.time() + expires_in)
    return {"name": served.name, "model": served.name, "size": status.budget_bytes, "size_vram": status.gpu_bytes,
            "digest": digest, "details": details(header, served.kind, served.file_type),
            "expires_at": expires, "context_length": served.n_ctx}
