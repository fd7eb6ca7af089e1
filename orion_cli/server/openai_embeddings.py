"""The OpenAI embeddings request (``/v1/embeddings``, and Ollama's ``/api/embed`` through it): its inputs,
its encoding and its dimensions, checked."""

from __future__ import annotations

from typing import Any

from .http_errors import APIError
from .openai import number

MAX_EMBEDDING_INPUTS = 2048


def embedding_inputs(value: Any) -> list[str | list[int]]:
    """A string, a list of strings, a token array or a list of token arrays, as a list (token arrays
    are cl100k_base ids, as OpenAI's API reads them: :mod:`.token_arrays` decodes them)."""
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


def encoding_format(doc: dict) -> str:
    fmt = doc.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return fmt


def check_dimensions(doc: dict, model_id: str, dim: int) -> None:
    if number(doc, "dimensions", None, 1, 2**31 - 1, integer=True) not in (None, dim):
        raise APIError(400, f"{model_id} makes {dim}-dimensional vectors; 'dimensions' cannot change that",
                       param="dimensions")
