"""The OpenAI wire format: requests parsed and checked (each bad field a 400 that names it), and the
response and chunk documents of completions, chat completions and embeddings.

No model work here and no web framework: the routes (:mod:`.app`) parse with these, call the
state, and answer with these documents.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..tools import ToolChoice
from .http_errors import APIError
from .openai_tools import as_text_turns, native_generation, parse_tool_answer, template_tool_format, tool_choice

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256
# Arrays and objects inside one another: no request of the API nests past 4 (a list of token arrays;
# a message's content parts), and Python's parser fails with a RecursionError somewhere near 1,000.
MAX_JSON_DEPTH = 64
# A model name, repo, id or path, in UTF-8 bytes; each part between slashes at most a file name's
# 255 bytes (past it the OS answers ENAMETOOLONG to every look-up of the name).
MAX_MODEL_NAME_BYTES = 1024
MAX_NAME_PART_BYTES = 255
# What a client may name, said where it named nothing (what is served depends on the server's options:
# the registered models and minilm; paths with --allow-paths, Hub names with --allow-fetch).
MODELS_HINT = "GET /v1/models lists them"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair


# ---------------------------------------------------------------- request bodies


async def read_json(chunks: AsyncIterator[bytes], declared: str | None) -> dict:
    """The request body (``chunks``, its ``Content-Length`` header ``declared``) as a JSON object."""
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                           code="request_too_large")
    return parse_json(bytes(body))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object: strict JSON (no NaN or Infinity), nested at most
    :data:`MAX_JSON_DEPTH` deep, every string valid Unicode (no half of a surrogate pair)."""
    too_deep = APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} deep", code="invalid_json")
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(doc, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _nested_deeper(body, MAX_JSON_DEPTH):
        raise too_deep
    if _SURROGATE_ESCAPE.search(body):  # only a \u escape makes one: UTF-8 bytes cannot
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"the request body has a lone UTF-16 surrogate (\\u{ord(exc.object[exc.start]):04x}) "
                                "in a string", code="invalid_json",
                           hint="a character past U+FFFF is a pair of \\u escapes, high then low") from None
    return doc


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def _nested_deeper(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in ``body`` (JSON that parsed: its
    brackets balance once its strings are gone). Each pass takes the innermost pairs away, so the
    passes to nothing are the depth; bytes methods only (a walk over a parsed list of a million
    token ids took a second)."""
    brackets = _JSON_STRING.sub(b"", body).translate(_SQUARE, _NOT_A_BRACKET)
    for _ in range(limit):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return False
    return True


def _shown(value, limit: int = 40) -> str:
    """A value as an error message quotes it: at most ``limit`` characters (not a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def number(doc: dict, key: str, default, lo: float, hi: float, *, integer: bool = False):
    value = doc.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} from {lo:g} to {hi:g}, not {_shown(value)}", param=key,
                       code="invalid_value")
    return value


def in_range(doc: dict, key: str, default, allowed):
    """``doc[key]`` (left out or null: ``default``) within ``allowed``, a :class:`orion_cli.limits.Range`:
    the CLI's rule for the same option, so ``orion run`` and the server refuse the same values. A whole
    number is an ``int`` (an integral float, ``256.0``, is taken as one)."""
    value = doc.get(key, default)
    if value is None:
        return default
    if not allowed.contains(value):
        raise APIError(400, f"'{key}' must be {allowed.describe()}, not {_shown(value)}", param=key,
                       code="invalid_value")
    return int(value) if allowed.integer else float(value)


def boolean(doc: dict, key: str, default: bool = False) -> bool:
    """A JSON true or false (null: the default); ``"false"`` is a string, not a boolean."""
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false, not {_shown(value)}", param=key, code="invalid_value")
    return value


def checked_name(name: str, key: str = "model") -> str:
    """A model name, repo, id or path from a request, bounded before anything looks it up: at most
    :data:`MAX_MODEL_NAME_BYTES` (and a file name's 255 between slashes), no control character, no
    home folder (``~user``) this machine lacks."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_MODEL_NAME_BYTES:
        raise APIError(400, f"'{key}' is {size} bytes long; the most is {MAX_MODEL_NAME_BYTES}", param=key,
                       code="invalid_value", hint=f"give the name of a model this server has ({MODELS_HINT})")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise APIError(400, f"'{key}' has a control character (U+{ord(bad):04X})", param=key, code="invalid_value")
    longest = max(name.split("/"), key=lambda part: len(part.encode("utf-8")))
    if len(longest.encode("utf-8")) > MAX_NAME_PART_BYTES:
        raise APIError(400, f"'{key}' has a part of {len(longest.encode('utf-8'))} bytes between slashes; "
                            f"the most is {MAX_NAME_PART_BYTES}", param=key, code="invalid_value")
    if name.startswith("~"):
        home = name.split("/", 1)[0]
        if os.path.expanduser(home) == home:  # where pathlib raises RuntimeError
            raise APIError(400, f"'{key}' starts with {_shown(home)}, a home folder this machine does not have",
                           param=key, code="invalid_value")
    return name


def model_name(doc: dict) -> str:
    name = doc.get("model")
    if name is not None and not isinstance(name, str):
        raise APIError(400, f"'model' must be a string, not {_shown(name)}", param="model", code="invalid_value")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, f"'model' is required: the name of a model this server has ({MODELS_HINT})",
                       param="model", code="missing_model")
    return checked_name(name.strip())


# The fields that name a model (an encoder's, on /api/orion/encoder and /api/orion/chunk), checked as names.
NAME_FIELDS = ("model", "prefer_id")


def optional_text(doc: dict, key: str) -> str | None:
    """A string field that may be left out; ``model`` and ``prefer_id`` are also checked as names."""
    value = doc.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise APIError(400, f"'{key}' must be a non-empty string", param=key, code="invalid_value")
    if value is not None and key in NAME_FIELDS:
        checked_name(value, key)
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


# ---------------------------------------------------------------- the parameters of chat and completions
#
# Every key of a /v1/chat/completions or /v1/completions body is in one of these sets, or the request
# is refused with a 400 that names it: nothing a client asks for is silently ignored. The table of
# docs/openai-parameters.md says the same, with the reasons.

# Read and honoured (each checked where it is parsed); n, best_of, echo and suffix only at the value
# that asks for nothing more (1, 1, false, ""): any other is refused.
HONOURED_CHAT = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "n",
    "response_format", "cache_prompt", "tools", "tool_choice", "parallel_tool_calls"})
HONOURED_COMPLETIONS = frozenset({
    "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logprobs", "n", "best_of", "echo", "suffix", "response_format",
    "cache_prompt"})
# Accepted and not used: nothing they say can change the text (who the end user is, whether OpenAI
# should store the answer, its tags, a billing tier, how long a prompt cache lives): a client library
# that sends them by default still works.
HARMLESS_CHAT = frozenset({"user", "safety_identifier", "store", "metadata", "service_tier", "prompt_cache_key",
                           "prompt_cache_options", "prompt_cache_retention"})
HARMLESS_COMPLETIONS = frozenset({"user"})


@dataclass(frozen=True)
class Refused:
    """A feature orion serve does not have: what it is, and the values that leave it off (accepted)."""

    feature: str
    off: tuple = (None,)
    later: bool = False  # another task builds it: "not supported yet"

    def allows(self, value) -> bool:
        return any(value == ok and type(value) is type(ok) for ok in self.off)

    def message(self, key: str) -> str:
        shown = [json.dumps(ok) for ok in self.off if ok is not None]
        give = f" or give {shown[0]}" if shown else ""
        return (f"'{key}' is not supported {'yet ' if self.later else ''}by orion serve ({self.feature}): "
                f"leave it out{give}")


REFUSED_CHAT: dict[str, Refused] = {
    "functions": Refused("function calls", (None, []), later=True),
    "function_call": Refused("function calls", (None, "none"), later=True),
    "logit_bias": Refused("biasing tokens", (None, {})),
    "modalities": Refused("it answers with text only", (None, ["text"])),
    "audio": Refused("it answers with text only"),
    "prediction": Refused("predicted outputs"),
    "reasoning_effort": Refused("reasoning models' effort"),
    "verbosity": Refused("reasoning models' verbosity"),
    "web_search_options": Refused("it does not search the web"),
    "moderation": Refused("it does not moderate requests or answers"),
}
REFUSED_COMPLETIONS: dict[str, Refused] = {"logit_bias": REFUSED_CHAT["logit_bias"]}


def check_parameters(doc: dict, *, chat: bool) -> None:
    """Refuse, with a 400 that names it, a key the route does not know and a feature it does not
    have; pass the honoured and the harmless ones (see the sets above)."""
    route = "/v1/chat/completions" if chat else "/v1/completions"
    honoured = HONOURED_CHAT if chat else HONOURED_COMPLETIONS
    harmless = HARMLESS_CHAT if chat else HARMLESS_COMPLETIONS
    refused = REFUSED_CHAT if chat else REFUSED_COMPLETIONS
    for key, value in doc.items():
        if key in honoured or key in harmless:
            continue
        if key in refused:
            if not refused[key].allows(value):
                raise APIError(400, refused[key].message(key), param=key, code="unsupported_parameter")
            continue
        other = "/v1/completions" if chat else "/v1/chat/completions"
        known_there = key in (HONOURED_COMPLETIONS | HARMLESS_COMPLETIONS | set(REFUSED_COMPLETIONS) if chat
                              else HONOURED_CHAT | HARMLESS_CHAT | set(REFUSED_CHAT))
        hint = (f"'{key}' is a parameter of {other}" if known_there
                else "docs/openai-parameters.md lists the parameters orion serve takes")
        raise APIError(400, f"unknown parameter {_shown(key)} for {route}", param=key, code="unknown_parameter",
                       hint=hint)
    if number(doc, "n", 1, 1, 2**31 - 1, integer=True) != 1:
        raise APIError(400, "'n' must be 1: orion serve makes one choice a request; leave it out", param="n",
                       code="unsupported_parameter")
    if not chat:
        if number(doc, "best_of", 1, 1, 2**31 - 1, integer=True) != 1:
            raise APIError(400, "'best_of' must be 1: orion serve makes one completion a request; leave it out",
                           param="best_of", code="unsupported_parameter")
        if boolean(doc, "echo"):
            raise APIError(400, "'echo' is not supported by orion serve (the prompt in the answer): leave it out "
                                "or give false", param="echo", code="unsupported_parameter")
        suffix = doc.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise APIError(400, f"'suffix' must be a string, not {_shown(suffix)}", param="suffix", code="invalid_value")
        if suffix:
            raise APIError(400, "'suffix' is not supported by orion serve (text inserted before it): leave it out "
                                "or give \"\"", param="suffix", code="unsupported_parameter")


def _max_tokens(doc: dict, n_ctx: int) -> int:
    """``max_tokens``, or ``max_completion_tokens`` (its new name, what current OpenAI clients and
    LangChain send): the same limit; both given, they must agree."""
    from .. import limits

    allowed = limits.max_tokens_range(n_ctx)
    old = in_range(doc, "max_tokens", None, allowed)
    new = in_range(doc, "max_completion_tokens", None, allowed)
    if old is not None and new is not None and old != new:
        raise APIError(400, f"'max_completion_tokens' ({new}) and 'max_tokens' ({old}) disagree; give one of them",
                       param="max_completion_tokens", code="invalid_value")
    return next((v for v in (new, old) if v is not None), DEFAULT_MAX_TOKENS)


def _logprobs(doc: dict, *, chat: bool) -> int | None:
    """How many of the most likely tokens to list beside each token's own log-probability (None: no
    log-probabilities). Chat: ``logprobs`` true, ``top_logprobs`` 0..20; completions: ``logprobs`` 0..5."""
    if not chat:
        return number(doc, "logprobs", None, 0, 5, integer=True)
    wanted = boolean(doc, "logprobs")
    top = number(doc, "top_logprobs", None, 0, 20, integer=True)
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return (top or 0) if wanted else None


def generation_options(doc: dict, n_ctx: int, *, chat: bool = True) -> dict:
    """The sampling options, each within the range :mod:`orion_cli.limits` gives the CLI's flag."""
    from .. import limits

    options = {
        "max_tokens": _max_tokens(doc, n_ctx),
        "temperature": in_range(doc, "temperature", 1.0, limits.TEMPERATURE),
        "top_p": in_range(doc, "top_p", 1.0, limits.TOP_P),
        "seed": in_range(doc, "seed", None, limits.SEED),
        "presence_penalty": in_range(doc, "presence_penalty", 0.0, limits.PENALTY),
        "frequency_penalty": in_range(doc, "frequency_penalty", 0.0, limits.PENALTY),
        # llama.cpp's server's name: reuse the cells an earlier request left for the same start (false:
        # the prompt is evaluated from its first token, the exact mode)
        "cache_prompt": boolean(doc, "cache_prompt", True),
        "response_format": response_format(doc),
    }
    logprobs = _logprobs(doc, chat=chat)
    if logprobs is not None:
        options["logprobs"] = logprobs
    return options


def response_format(doc: dict) -> dict | None:
    """OpenAI's ``response_format``, checked: ``{"type": "text"}``, ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}`` (the grammar is made
    from it where the model is: :mod:`orion_cli.engine.grammar`)."""
    value = doc.get("response_format")
    if value is None:
        return None
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(value, dict) or value.get("type") not in kinds:
        raise APIError(400, f"'response_format' must be an object whose 'type' is one of {', '.join(kinds)}, "
                            f"not {_shown(value)}", param="response_format", code="invalid_value")
    if value["type"] != "json_schema":
        return None if value["type"] == "text" else {"type": value["type"]}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise APIError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                       param="response_format.json_schema", code="invalid_value")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise APIError(400, "'response_format.json_schema.name' must be a string",
                       param="response_format.json_schema.name", code="invalid_value")
    # OpenAI's default when no schema is given is any JSON object
    return {"type": "json_schema", "json_schema": {"name": name, "schema": spec.get("schema") or {"type": "object"}}}


def chat_parts(doc: dict) -> tuple[str | None, list[dict], str]:
    """(system, history, last user message) from OpenAI ``messages``."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    messages = as_text_turns(messages)  # tool calls and results, as text any template holds
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
            if not all(isinstance(p.get("text"), str) for p in parts):
                raise APIError(400, f"messages[{i}].content: each text part's 'text' must be a string",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in parts)
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


def completion_prompt(doc: dict) -> str:
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string", param="prompt")
    return prompt


@dataclass
class Asked:
    """What a chat or text completion request asks for (checked, before any model is resolved)."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt: str
    system: str | None
    history: list[dict]
    stops: list[str]
    stream: bool
    include_usage: bool
    tools: ToolChoice | None = None  # the tools offered (the answer is then a call or a reply)
    messages: list | None = None  # a chat's messages as sent (checked): for a template's own tool format
    tool_format: str | None = None  # the tool format the generation used: a template's, or None (orion's)

    @classmethod
    def parse(cls, doc: dict, *, chat: bool) -> Asked:
        check_parameters(doc, chat=chat)
        stream = boolean(doc, "stream")
        options = doc.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise APIError(400, f"'stream_options' must be an object, not {_shown(options)}", param="stream_options",
                           code="invalid_value")
        usage = (options or {}).get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise APIError(400, f"'stream_options.include_usage' must be true or false, not {_shown(usage)}",
                           param="stream_options.include_usage", code="invalid_value")
        include_usage = bool(usage) and stream  # stream_options count only in a stream
        stops = stop_strings(doc)
        offered = tool_choice(doc) if chat else None
        if offered is not None and response_format(doc) is not None:
            raise APIError(400, "'response_format' and 'tools' cannot be used together: a tool call is JSON already",
                           param="response_format", code="invalid_value")
        if chat:
            system, history, prompt = chat_parts(doc)
        else:
            system, history, prompt = None, [], completion_prompt(doc)
        return cls(chat, prompt, system, history, stops, stream, include_usage, offered,
                   doc["messages"] if chat else None)

    def generation(self, model, options: dict):
        """The core's generation for this request (a plain continuation on /v1/completions). Tools
        (and a conversation's tool turns) go in the model's own tool format where its chat template
        has one (:mod:`orion_cli.tool_formats`), else in orion's (:mod:`orion_cli.tools`)."""
        from .. import tools
        from ..generation import Generation

        fmt = template_tool_format(model, self.tools, self.messages) if self.chat else None
        self.tool_format = fmt.name if fmt is not None else None
        if fmt is not None:
            return native_generation(model, fmt, self.messages, self.tools, options, self.stops)
        system = self.system
        if self.tools is not None:  # offered in the system text; the answer held to a call or a reply
            system = (system + "\n\n" if system else "") + tools.instructions(self.tools)
            options = options | {"response_format": {"type": "json_schema", "json_schema": {
                "name": "tool_answer", "schema": tools.schema(self.tools)}}}
        return Generation(model, self.prompt, options, self.stops, chat=None if self.chat else False,
                          system=system, history=self.history)

    def tool_answer(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(reply text, tool calls) of an answer to a request with tools, in the format it was asked in."""
        return parse_tool_answer(self.tool_format, text)
