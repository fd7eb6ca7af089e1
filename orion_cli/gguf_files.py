"""GGUF file names: the parts of a split file (``x-00001-of-00003.gguf``) and a repo's files as models.

A leaf (no orion imports): the header reader, the registry, ``rm`` and ``fetch`` all group files by it.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_names(filename: str) -> list[str] | None:
    """For ``x-00001-of-00003.gguf``, the names of all three parts; None if not split."""
    m = SPLIT_RE.match(filename)
    if not m:
        return None
    count = int(m.group("count"))
    return [f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def is_projector(name: str) -> bool:
    return "mmproj" in Path(name).name.lower()


def split_group(name: str) -> tuple[str, ...]:
    """All parts of a split GGUF (``x-00001-of-00003.gguf``), in the same folder; else just the name."""
    parts = split_part_names(Path(name).name)
    if not parts:
        return (name,)
    folder = str(Path(name).parent)
    return tuple(p if folder == "." else f"{folder}/{p}" for p in parts)


def group_gguf_files(names: list[str], pattern: str = "*.gguf") -> list[tuple[str, ...]]:
    """GGUF files of a repo grouped as models: a split file's parts together, projectors left out."""
    groups: list[tuple[str, ...]] = []
    for name in sorted(names):
        if not name.endswith(".gguf") or is_projector(name) or not fnmatch.fnmatch(Path(name).name, pattern):
            continue
        group = split_group(name)
        if name == group[0]:  # a split file is listed once, through its first part
            groups.append(group)
    return groups


