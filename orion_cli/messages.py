"""Chat messages, built in one place: the engine's templates, ``run``'s REPL and the server's client all
read them. A leaf (no orion imports): the CLI's client path must not import the engine."""

from __future__ import annotations

from typing import Sequence


def chat_messages(system: str | None, history: Sequence[dict], prompt: str, images: Sequence = ()) -> list[dict]:
    """OpenAI-shaped messages for a chat template: the system text, the earlier turns, then the user's
    prompt (with its images as file URLs, for a vision model)."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    if images:
        from pathlib import Path

        content = [{"type": "text", "text": prompt}] + [
            {"type": "image_url", "image_url": {"url": Path(p).absolute().as_uri()}} for p in images]
        return messages + [{"role": "user", "content": content}]
    return messages + [{"role": "user", "content": prompt}]


# ---------------------------------------------------------------- the format a chat is evaluated in

# What a response names as the format its prompt was built in (``x-orion-chat-template``):
OWN_TEMPLATE = "gguf"  # the GGUF's tokenizer.chat_template, as llama-cpp-python renders it
CHAT_HANDLER = "chat-handler"  # a vision model's: llama-cpp-python's chat handler builds it
TRANSCRIPT = "transcript"  # orion's fallback for a family llama.cpp has no format for: "User: ...\nAssistant: ..."
PLAIN = "none"  # no chat format: the text itself (/v1/completions; one prompt to a model without a template)

# A GGUF without a chat template (a base model, a hand-made conversion) is still chatted with in its
# family's turn format where llama-cpp-python has that format built in (llama_cpp.llama_chat_format,
# by the name it is registered under), chosen by the header's general.architecture; any other family
# gets the plain transcript.
FAMILY_FORMATS = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
}
TRANSCRIPT_STOPS = ["\nUser:"]


def fallback_format(architecture: str) -> str:
    """The format a model of ``architecture`` without a chat template is chatted with."""
    return FAMILY_FORMATS.get(architecture, TRANSCRIPT)


def chat_mode(has_template: bool, is_vision: bool, prompt: str, system: str | None, history: Sequence[dict],
              chat: bool | None) -> tuple[str, str | None, bool]:
    """(prompt, system, whether a chat format applies). A model with a template (or a vision model)
    always chats; one without chats once there is a conversation (earlier turns), its first prompt
    staying the plain text it continues, with the system text leading it (a base model asked "Monday,
    Tuesday," says "Wednesday"). ``chat`` forces the choice (False: a plain completion, True: a chat)."""
    use_chat = (has_template or is_vision or bool(history)) if chat is None else chat
    if system and not use_chat:
        prompt, system = f"{system}\n\n{prompt}", None  # no format to put it in: it leads the text
    return prompt, system, use_chat


def chat_format(has_template: bool, is_vision: bool, architecture: str, system: str | None,
                history: Sequence[dict], chat: bool | None) -> str:
    """The name of the format a prompt is evaluated in (the rules of :func:`chat_mode`)."""
    if not chat_mode(has_template, is_vision, "", system, history, chat)[2]:
        return PLAIN
    if is_vision:
        return CHAT_HANDLER
    return OWN_TEMPLATE if has_template else fallback_format(architecture)


def transcript(messages: Sequence[dict]) -> tuple[str, list[str]]:
    """A conversation as a plain transcript for a model with no known format: the system text first,
    then ``User: ...`` and ``Assistant: ...`` lines, ending with ``Assistant:`` for the answer; it stops
    where the model would write the user's next turn. Every message is in it."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(f"{m['content']}\n")
        else:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
    return "\n".join(lines + ["Assistant:"]), list(TRANSCRIPT_STOPS)


def system_in_first_turn(messages: Sequence[dict]) -> list[dict]:
    """The messages for a format with no system role (gemma's: llama-cpp-python's format_gemma drops
    it): the system text leads the first user turn, as Gemma's own template puts it."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        first = next((m for m in rest if m["role"] == "user"), None)
        if first is None:
            rest.insert(0, {"role": "user", "content": system})
        else:
            first["content"] = f"{system}\n\n{first['content']}"
    return rest
