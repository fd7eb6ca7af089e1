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
