"""OpenAI's tool calls on the wire: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked
(each bad field a 400 that names it), and a conversation's tool turns (an assistant's ``tool_calls``,
``role: "tool"`` results) written as text for any template (:mod:`orion_cli.tools` says how)."""

from __future__ import annotations

import re

from .. import tools
from .http_errors import APIError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def tool_choice(doc: dict) -> tools.ToolChoice | None:
    """The tools a chat request offers and what it asks (None: no tools, or ``tool_choice`` "none")."""
    offered = doc.get("tools")
    choice = doc.get("tool_choice")
    parallel = doc.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "'parallel_tool_calls' must be true or false")
    if offered is None or offered == []:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "'tool_choice' asks for a tool, but the request offers no 'tools'")
        return None
    if not isinstance(offered, list) or len(offered) > 128:
        raise _bad("tools", "'tools' must be a list of at most 128 functions")
    found: dict[str, tools.Tool] = {}
    for i, t in enumerate(offered):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}")
        name, params = fn.get("name"), fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _bad(f"tools[{i}].function.name", f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -")
        if name in found:
            raise _bad(f"tools[{i}].function.name", f"two tools are named {name!r}")
        if not isinstance(params, dict) or not isinstance(fn.get("description", ""), str):
            raise _bad(f"tools[{i}].function", f"tools[{i}].function: 'parameters' must be a JSON-schema object "
                                               "and 'description' a string")
        found[name] = tools.Tool(name, fn.get("description") or "", params)
    if choice in (None, "auto"):
        return tools.ToolChoice(tuple(found.values()), "auto", parallel)
    if choice == "none":
        return None
    if choice == "required":
        return tools.ToolChoice(tuple(found.values()), "required", parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(named, str):
        raise _bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if named not in found:
        raise _bad("tool_choice", f"'tool_choice' names {named!r}, which is not one of the 'tools'")
    return tools.ToolChoice((found[named],), "required", parallel)


def as_text_turns(messages: list) -> list:
    """``messages`` with each tool turn written as text: an assistant's ``tool_calls`` as its
    content, a ``tool`` result as a user turn (one user turn for results that follow each other)."""
    names = {}
    out: list = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise _bad(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be a list of "
                                                        "{\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
            names |= {c.get("id"): c["function"]["name"] for c in calls}
            text = tools.call_text(calls)
            if isinstance(m.get("content"), str) and m["content"]:
                text = m["content"] + "\n" + text
            out.append({"role": "assistant", "content": text})
        elif m.get("role") == "tool":
            content = _text_of(m.get("content"))
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content", f"messages[{i}].content (a tool's result) must be a string")
            call_id = m.get("tool_call_id")
            if call_id not in names:  # OpenAI's rule: a result answers a call made before it
                raise _bad(f"messages[{i}]", f"messages[{i}] is a tool's result, but no earlier assistant message "
                                             f"made a call with its tool_call_id ({call_id!r})")
            text = tools.result_text(names.get(call_id), call_id, content)
            if out and isinstance(out[-1], dict) and out[-1].get("role") == "user" and out[-1].get("_tool"):
                out[-1] = out[-1] | {"content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} if isinstance(m, dict) else m for m in out]


def _text_of(content):
    """A message's content with its text parts joined (OpenAI's list of parts), else as it came."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


def template_tool_format(model, choice: tools.ToolChoice | None, messages: list):
    """The tool format of the model's chat template (:mod:`orion_cli.tool_formats`) when the chat offers
    tools or holds tool turns, else None (orion's own format, or no tools at all)."""
    from ..tool_formats import detect

    has_turns = any(isinstance(m, dict) and (m.get("role") == "tool" or (m.get("role") == "assistant"
                                                                          and m.get("tool_calls")))
                    for m in messages)
    if (choice is None and not has_turns) or not model.has_chat_template:
        return None
    return detect(model.header.get("tokenizer.chat_template"))


def parse_tool_answer(format_name: str | None, text: str) -> tuple[str | None, list[dict] | None]:
    """(reply text, tool calls) of an answer to a request with tools, in the format it was asked in
    (a template's, by name; None: orion's)."""
    from ..tool_formats import FORMATS

    return FORMATS[format_name].parse(text) if format_name is not None else tools.parse_answer(text)


def native_conversation(messages: list, fmt) -> tuple[str | None, list[dict]]:
    """(system, the rest) of checked ``messages`` (``chat_parts`` and :func:`as_text_turns` passed them)
    for a template with a tool format of its own: tool turns as they are, text parts joined, the
    calls' arguments as objects (:func:`orion_cli.tool_formats.template_messages`)."""
    from ..tool_formats import template_messages

    out = []
    for m in messages:
        content = _text_of(m.get("content"))
        role = "system" if m["role"] == "developer" else m["role"]
        turn = {"role": role, "content": content if isinstance(content, str) else ""}
        if role == "assistant" and m.get("tool_calls"):
            turn["tool_calls"] = m["tool_calls"]
        if role == "tool":
            turn |= {k: m[k] for k in ("tool_call_id", "name") if k in m}
        out.append(turn)
    system = out.pop(0)["content"] if out and out[0]["role"] == "system" else None
    return system, template_messages(out, fmt)


def native_generation(model, fmt, messages: list, choice: tools.ToolChoice | None, options: dict, stops: list):
    """The core's generation of a chat in a template's own tool format: the conversation as the template
    reads it, the tools it is rendered with, and (with tools offered) the answer held to calls in that
    format, from its first token ("required") or from the format's opening on ("auto")."""
    from ..generation import Generation
    from ..tool_formats import template_tools

    system, messages = native_conversation(messages, fmt)
    prompt = messages.pop()["content"] if messages[-1]["role"] == "user" else None
    if choice is not None:
        options = options | {"response_format": {
            "type": "tool_calls", "schema": fmt.call_schema(choice), "opening": fmt.open,
            "separator": fmt.separator if fmt.parallel(choice) else None, "closing": fmt.close}}
        if choice.mode == "auto":
            options["grammar_triggers"] = [fmt.trigger]
    return Generation(model, prompt, options, stops, system=system, history=messages, tools=template_tools(choice))
