"""Text cut into chunks for an encoder: at blank lines or line ends where possible, each at most an
encoder window of word pieces, each starting with a few of the previous one's last lines. The token
counting is the caller's (:meth:`orion_cli.embeddings.Encoder.chunks_and_sequences` asks the model)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

DEFAULT_MAX_TOKENS = 256  # the encoder's window (all-MiniLM-L6-v2's, as sentence-transformers cuts it)


@dataclass(frozen=True)
class Chunk:
    text: str
    start_byte: int
    end_byte: int
    start_line: int  # 1-based, inclusive
    end_line: int


def chunk_text(text: str, count_tokens: Callable[[str], int], max_tokens: int = DEFAULT_MAX_TOKENS - 2,
               overlap_tokens: int = 32) -> list[Chunk]:
    """Chunks of at most ``max_tokens`` word pieces, cut at blank lines or line ends where possible,
    each starting with up to ``overlap_tokens`` of the previous one's last lines."""
    return make_chunks(*chunk_spans(text, count_tokens, max_tokens, overlap_tokens))


NOT_WORDPIECE_SPACE = "\x1c\x1d\x1e\x1f"  # spaces to str.splitlines and re's \s, not to llama.cpp's WordPiece
Piece = tuple[str, int, int]  # a line, or part of a long line: (text, line number, byte offset)


def chunk_spans(text: str, count_tokens: Callable[[str], int], max_tokens: int = DEFAULT_MAX_TOKENS - 2,
                overlap_tokens: int = 32) -> tuple[list[Piece], list[tuple[int, int]]]:
    """:func:`chunk_text`'s cuts: the text's pieces (lines, long lines cut at spaces) and each chunk
    as the span ``pieces[i:j]`` (spans of blank pieces only are left out)."""
    lines = text.splitlines(keepends=True)
    pieces: list[Piece] = []
    offset = 0
    for number, line in enumerate(lines, 1):
        n = count_tokens(line) if line.strip() else 0
        if n <= max_tokens:
            pieces.append((line, number, offset))
        else:  # a line longer than a chunk: cut it at spaces
            words = re.split(r"(?<=\s)", line)
            current, start = "", offset
            for w in words:
                if current and count_tokens(current + w) > max_tokens:
                    pieces.append((current, number, start))
                    start += len(current.encode())
                    current = ""
                current += w
            if current:
                pieces.append((current, number, start))
        offset += len(line.encode())

    counts = [count_tokens(p[0]) if p[0].strip() else 0 for p in pieces]
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        total, j = 0, i
        while j < len(pieces) and (total + counts[j] <= max_tokens or j == i):
            total += counts[j]
            j += 1
        # prefer to end at a paragraph break (a blank line) in the second half of the chunk
        for k in range(j - 1, i + (j - i) // 2, -1):
            if not pieces[k][0].strip() and j < len(pieces):
                j = k + 1
                break
        if any(p[0].strip() for p in pieces[i:j]):
            spans.append((i, j))
        if j >= len(pieces):
            break
        back, k = 0, j
        while k > i + 1 and back + counts[k - 1] <= overlap_tokens:
            back += counts[k - 1]
            k -= 1
        i = k if k > i else j
    return pieces, spans


def make_chunks(pieces: list[Piece], spans: list[tuple[int, int]]) -> list[Chunk]:
    """The chunks of :func:`chunk_spans`' spans: each span's pieces joined, with its bytes and lines."""
    chunks = []
    for i, j in spans:
        body = "".join(p[0] for p in pieces[i:j])
        start_byte = pieces[i][2]
        chunks.append(Chunk(body, start_byte, start_byte + len(body.encode()), pieces[i][1], pieces[j - 1][1]))
    return chunks
