"""The tokens a prompt is evaluated as: the model's chat template, a fallback format for a model
without one (its family's, or a transcript), or the plain text; and the format's stop strings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..messages import (
    TRANSCRIPT,
    chat_messages,
    fallback_format,
    system_in_first_turn,
    transcript,
)
from ._binding import token_text

if TYPE_CHECKING:
    from .model import LoadedModel


def prompt_tokens(model: "LoadedModel", prompt: str | None, *, system: str | None = None,
                  history: Sequence[dict] = (), chat: bool | None = None,
                  tools: list[dict] | None = None) -> tuple[list[int], list[str]]:
    """The tokens a prompt is evaluated as, and the format's stop strings, in the format
    :func:`orion_cli.messages.chat_format` names (the rules of :func:`orion_cli.messages.chat_mode`):
    the model's chat template as llama-cpp-python's create_chat_completion builds it; for a model
    without one, its family's format from llama-cpp-python, else the plain transcript (never the last
    message alone: every turn is in the prompt); or the plain text with BOS (the system text leading it).

    ``tools`` (OpenAI's shape), for a template with a tool format of its own (:mod:`orion_cli.tool_formats`):
    the template is rendered with them, and ``history`` may hold tool turns as the template reads them;
    ``prompt`` None: ``history`` is the whole conversation (it may end with a tool's result)."""
    llm = model._llm
    if prompt is None:
        if not model.has_chat_template:
            raise ValueError("a conversation without a closing user message needs the model's chat template")
        return _template_tokens(llm, ([{"role": "system", "content": system}] if system else []) + list(history), tools)
    prompt, system, use_chat = model.chat_mode(prompt, system, history, chat)
    if not use_chat:  # plain text
        text = f"{system}\n\n{prompt}" if system else prompt
        return llm.tokenize(text.encode(), add_bos=True, special=True), []
    messages = chat_messages(system, history, prompt)
    if not model.has_chat_template:
        return _fallback_tokens(llm, fallback_format(model.header.architecture), messages)
    return _template_tokens(llm, messages, tools)


def _template_tokens(llm, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[str]]:
    """The conversation in the GGUF's chat template, as llama-cpp-python's create_chat_completion renders it."""
    from llama_cpp import llama_chat_format

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=token_text(llm, eos_id) if eos_id != -1 else "",
        bos_token=token_text(llm, bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id])
    result = formatter(messages=messages, tools=tools)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True), _stop_list(result.stop)


def _fallback_tokens(llm, name: str, messages: list[dict]) -> tuple[list[int], list[str]]:
    """A conversation in the fallback format ``name``: one of llama-cpp-python's built-in formats
    (its function ``format_NAME``; gemma's drops the system role, so its text leads the first
    turn) or orion's transcript. BOS is added: the built-in formats leave it to the tokenizer."""
    if name == TRANSCRIPT:
        text, stops = transcript(messages)
        return llm.tokenize(text.encode(), add_bos=True, special=True), stops
    from llama_cpp import llama_chat_format

    if name == "gemma":
        messages = system_in_first_turn(messages)
    # llama-cpp-python takes a message without text for the turn left open (the answer's): an empty
    # one (an answer stopped before its first piece) is a turn with a blank instead
    messages = [m if m["content"] else {**m, "content": " "} for m in messages]
    response = getattr(llama_chat_format, f"format_{name}")(messages=messages)
    # gemma's stop is "<end_of_turn>\n": the model may end its turn without the newline
    stops = [s.strip() or s for s in _stop_list(response.stop)]
    return llm.tokenize(response.prompt.encode(), add_bos=True, special=True), stops


def _stop_list(stop) -> list[str]:
    """The template's stop strings; an empty one (a template whose EOS has no text) would cut every answer
    at its first character, and is left out."""
    stops = stop if isinstance(stop, list) else [stop] if stop else []
    return [s for s in stops if s]
