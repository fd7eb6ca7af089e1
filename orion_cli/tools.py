"""Tool calls with any model, as llama.cpp's server does for a model without a tool format of its own:
the tools are described in the system text, and the answer is held by a grammar (a JSON schema made
a llama.cpp grammar: :mod:`orion_cli.engine.grammar`) to one JSON object, either
``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` (each call's arguments valid against its
tool's parameters) or ``{"response": "..."}`` (an answer to the user, where the choice allows one).
Earlier calls and their results are written back into the conversation in the same words, so any
chat template (or the fallback formats of a model without one) can hold them.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of the arguments (an object)


@dataclass(frozen=True)
class ToolChoice:
    """The tools a request offers and what it asks of the answer: ``mode`` "auto" (a call or a
    reply) or "required" (calls only; OpenAI's named choice is "required" with that one tool);
    ``parallel``: several calls in one answer."""

    tools: tuple[Tool, ...]
    mode: str = "auto"
    parallel: bool = True


def instructions(choice: ToolChoice) -> str:
    """The system text that offers the tools and says how to answer."""
    listed = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                         for t in choice.tools], ensure_ascii=False)
    calls = 'one or more calls' if choice.parallel else 'one call'
    if choice.mode == "auto":
        how = ('Answer with one JSON object: {"tool_calls": [{"name": TOOL, "arguments": {...}}]} to call '
               f'{calls}, or {{"response": TEXT}} to answer the user yourself.')
    else:
        how = f'Answer with one JSON object: {{"tool_calls": [{{"name": TOOL, "arguments": {{...}}}}]}}, {calls}.'
    return f"You can call these tools: {listed}\n{how}"


def schema(choice: ToolChoice) -> dict:
    """The JSON schema the answer is held to."""
    one = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False} for t in choice.tools]
    calls = {"type": "object", "properties": {"tool_calls": {
        "type": "array", "items": one[0] if len(one) == 1 else {"anyOf": one}, "minItems": 1,
        **({} if choice.parallel else {"maxItems": 1})}}, "required": ["tool_calls"], "additionalProperties": False}
    if choice.mode != "auto":
        return calls
    reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
             "additionalProperties": False}
    return {"anyOf": [calls, reply]}


def parse_answer(text: str) -> tuple[str | None, list[dict] | None]:
    """(reply text, None) or (None, OpenAI's ``tool_calls``) from an answer the grammar held; an
    answer cut short (``max_tokens``) is not JSON yet: it is given back as text, as it came."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text, None
    if isinstance(doc, dict) and isinstance(doc.get("tool_calls"), list):
        return None, [{"id": "call_" + secrets.token_hex(12), "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in doc["tool_calls"]]
    if isinstance(doc, dict) and isinstance(doc.get("response"), str):
        return doc["response"], None
    return text, None


def call_text(calls: list[dict]) -> str:
    """An assistant's earlier tool calls (OpenAI's shape), written as the model would have answered."""
    out = []
    for c in calls:
        fn = c["function"]
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            arguments = fn.get("arguments")
        out.append({"name": fn["name"], "arguments": arguments})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def result_text(name: str | None, call_id: str | None, content: str) -> str:
    """A tool's result, as the turn that follows the call."""
    who = name or call_id or "the tool"
    return f"The result of {who}: {content}"
