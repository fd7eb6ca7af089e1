"""Tool calls in a chat template's own format, for a model whose template has one (as llama.cpp's
server does with ``--jinja``, common/chat.cpp): the template is rendered with the request's ``tools``
(it writes them where the model was trained to read them) and with the conversation's tool turns as
they are (an assistant's ``tool_calls``, ``role: "tool"`` results); the answer is held by a grammar to
calls in the model's own syntax, and parsed back into OpenAI's ``tool_calls``.

Which format a template has is read from its text, as llama.cpp does:

- ``hermes`` (Hermes 2/3, Qwen 2.5, Qwen 3 and the many templates of their shape): each call
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; the template mentions ``<tool_call>``.
- ``mistral`` (Mistral Nemo, Small, Large 2): ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]``,
  the id nine letters or digits; the template mentions ``[TOOL_CALLS]``.
- ``llama3`` (Llama 3.1, 3.2, 3.3's JSON tool calls): one call ``{"name": ..., "parameters": {...}}``;
  the template has Llama 3's headers and the ``ipython`` role.

A model whose template has none of them (or no template) gets orion's generic format
(:mod:`orion_cli.tools`). With ``tool_choice`` "auto" the grammar waits for the format's opening
(llama.cpp's lazy grammar): the model may answer in words instead; "required" (or a named tool) holds
the answer to calls from its first token.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from .tools import ToolChoice


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # the text before the first call
    separator: str | None  # between two calls (None: one call an answer)
    close: str  # after the last
    arguments_key: str  # "arguments" or "parameters"
    trigger: str  # a regex (llama.cpp's lazy-grammar pattern: the grammar starts at its first group)
    with_id: bool = False  # each call carries its id (Mistral's nine characters)

    def call_schema(self, choice: ToolChoice) -> dict:
        """The JSON schema of one call object in this format (one of the offered tools)."""
        one = []
        for t in choice.tools:
            props = {"name": {"const": t.name}, self.arguments_key: t.parameters or {"type": "object"}}
            required = ["name", self.arguments_key]
            if self.with_id:
                props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
                required.append("id")
            one.append({"type": "object", "properties": props, "required": required, "additionalProperties": False})
        return one[0] if len(one) == 1 else {"anyOf": one}

    def parallel(self, choice: ToolChoice) -> bool:
        return choice.parallel and self.separator is not None

    def parse(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(reply text, None) or (text before the calls or None, OpenAI's ``tool_calls``). An answer
        cut short (``max_tokens``) or in words comes back as text, as it came."""
        if self.name == "hermes":
            return _parse_hermes(text)
        body = text
        if self.name == "mistral":
            # [TOOL_CALLS] is a control token in Mistral's vocabularies: its text is not in the answer
            at = body.find("[TOOL_CALLS]")
            head, body = (body[:at], body[at + len("[TOOL_CALLS]"):]) if at >= 0 else ("", body)
            if at < 0 and not body.lstrip().startswith("[{"):
                return text, None
        else:
            head = ""
        try:
            doc = json.loads(body)
        except ValueError:
            return text, None
        docs = doc if isinstance(doc, list) else [doc]
        if not docs or not all(isinstance(d, dict) and isinstance(d.get("name"), str)
                               and isinstance(d.get(self.arguments_key), dict) for d in docs):
            return text, None
        calls = [_openai_call(d["name"], d[self.arguments_key], d.get("id")) for d in docs]
        return (head.strip() or None), calls


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>", "arguments",
                    r"(<tool_call>)")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS][", ", ", "]", "arguments", r"(\[TOOL_CALLS\])", with_id=True)
LLAMA3 = ToolFormat("llama3", "", None, "", "parameters", r"^\s*(\{\s*\")[\s\S]*$")
FORMATS = {f.name: f for f in (HERMES, MISTRAL, LLAMA3)}


def detect(template: str | None) -> ToolFormat | None:
    """The tool format of a chat template (its Jinja text), or None."""
    if not template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|start_header_id|>" in template and "ipython" in template:
        return LLAMA3
    return None


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _parse_hermes(text: str) -> tuple[str | None, list[dict] | None]:
    at = text.find("<tool_call>")
    if at < 0:
        return text, None
    calls = []
    for body in _HERMES_CALL.findall(text[at:]):
        try:
            doc = json.loads(body)
        except ValueError:
            return text, None
        if not (isinstance(doc, dict) and isinstance(doc.get("name"), str) and isinstance(doc.get("arguments"), dict)):
            return text, None
        calls.append(_openai_call(doc["name"], doc["arguments"], None))
    if not calls:
        return text, None
    return (text[:at].strip() or None), calls


def _openai_call(name: str, arguments: dict, call_id: str | None) -> dict:
    return {"id": call_id or "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def mistral_id() -> str:
    """A call id as Mistral's templates require: nine letters or digits."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def template_tools(choice: ToolChoice | None) -> list[dict] | None:
    """The ``tools`` a template is rendered with (OpenAI's shape, as Hugging Face templates read it)."""
    if choice is None:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in choice.tools]


def template_messages(messages: list[dict], fmt: ToolFormat) -> list[dict]:
    """The conversation as a Hugging Face chat template reads it: each call's arguments an object (the
    templates write them with ``tojson``; OpenAI sends a JSON string), a call id the format accepts
    (Mistral's templates refuse any id but nine letters or digits: an id of another shape is mapped to
    one, the same for the call and its result)."""
    ids: dict[str, str] = {}

    def call_id(value):
        if fmt.name != "mistral" or not isinstance(value, str):
            return value
        if re.fullmatch(r"[a-zA-Z0-9]{9}", value):
            return value
        return ids.setdefault(value, mistral_id())

    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c["function"]
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    arguments = fn.get("arguments")
                calls.append({"id": call_id(c.get("id")), "type": "function",
                              "function": {"name": fn["name"], "arguments": arguments}})
            out.append({"role": "assistant", "content": m.get("content") or "", "tool_calls": calls})
        elif m.get("role") == "tool":
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")}
                       | {"tool_call_id": call_id(m.get("tool_call_id"))})
        else:
            out.append(m)
    return out
