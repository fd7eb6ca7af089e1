"""Read a GGUF file's header (metadata and tensor table) without loading its weights.

The parser reads through a :class:`ByteSource`, so the same code reads a local
file and a remote one through HTTP range requests (see ``hub.py``). It checks
every count and length against sane limits and against the file size, so a
random, truncated or absurd file becomes :class:`~orion_cli.errors.NotAGGUF`
instead of reaching llama.cpp, which can abort the process on such input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from .errors import NotAGGUF, NotFound
from .gguf_files import split_part_names

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Limits far above any real model, far below what would exhaust memory.
MAX_TENSORS = 1_000_000
MAX_KV = 100_000
MAX_STRING = 64 * 1024**2
MAX_ARRAY = 100_000_000
MAX_DIMS = 4
# Arrays up to this many items are kept in the metadata; longer ones (the vocabulary,
# merges, scores) are only counted.
KEEP_ARRAY_ITEMS = 1024

_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")



class ByteSource(Protocol):
    """Random access to the bytes of a file: local, or remote through range requests."""

    name: str
    size: int | None

    def read_at(self, offset: int, n: int) -> bytes: ...


class LocalFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = str(path)
        if not self.path.exists():
            raise NotFound(f"no such file: {path}", hint="check the path")
        if self.path.is_dir():
            raise NotAGGUF(f"{path} is a directory, not a GGUF file", hint="pass the .gguf file inside it")
        if not self.path.is_file():  # a FIFO would block the read forever, a device never end
            raise NotAGGUF(f"{path} is not a regular file (a FIFO, socket or device)", hint="pass a .gguf model file")
        self.size = self.path.stat().st_size
        self._f = self.path.open("rb")

    def read_at(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


class _Cursor:
    """Sequential reads over a ByteSource, fetched in growing windows."""

    def __init__(self, source: ByteSource, first_window: int = 1 << 20) -> None:
        self.source = source
        self.pos = 0
        self._buf = b""
        self._buf_start = 0
        self._window = first_window

    def _ensure(self, n: int) -> None:
        end = self.pos + n
        if self._buf_start <= self.pos and end <= self._buf_start + len(self._buf):
            return
        if self.source.size is not None and end > self.source.size:
            raise NotAGGUF(
                f"{self.source.name} is truncated: its header needs byte {end:,} but the file has {self.source.size:,}",
                hint="download it again",
            )
        want = max(n, self._window)
        if self.source.size is not None:
            want = min(want, self.source.size - self.pos)
        data = self.source.read_at(self.pos, want)
        if len(data) < n:
            raise NotAGGUF(f"{self.source.name} is truncated inside its header", hint="download it again")
        self._buf, self._buf_start = data, self.pos
        self._window = min(self._window * 2, 64 << 20)

    def read(self, n: int) -> bytes:
        self._ensure(n)
        start = self.pos - self._buf_start
        self.pos += n
        return self._buf[start : start + n]

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._ensure(size)
        value = struct.unpack_from(fmt, self._buf, self.pos - self._buf_start)[0]
        self.pos += size
        return value

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` GGUF strings (a vocabulary: hundreds of thousands) in one tight loop."""
        unpack = _U64.unpack_from
        pos = self.pos
        for _ in range(count):
            off = pos - self._buf_start
            if off + 8 > len(self._buf):
                self.pos = pos
                self._ensure(8)
                off = pos - self._buf_start
            n = unpack(self._buf, off)[0]
            if n > MAX_STRING:
                raise NotAGGUF(f"{self.source.name} has an absurd string length ({n:,} bytes) in its header",
                               hint="the file is damaged or not a GGUF model")
            pos += 8 + n
        if self.source.size is not None and pos > self.source.size:
            raise NotAGGUF(f"{self.source.name} is truncated inside its header", hint="download it again")
        self.pos = pos

    def skip(self, n: int) -> None:
        if self.source.size is not None and self.pos + n > self.source.size:
            raise NotAGGUF(f"{self.source.name} is truncated inside its header", hint="download it again")
        self.pos += n


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array that was counted, not kept (e.g. the vocabulary)."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself (all parts of a split file together)."""

    name: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_size: int | None
    parts: int = 1
    data_offset: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def file_type(self) -> str:
        """The quantization named by ``general.file_type`` (Q4_K_M, Q8_0, F16, ...)."""
        return file_type_name(self.metadata.get("general.file_type"), self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_params if self.n_params else 0.0

    @property
    def n_layers(self) -> int:
        return int(self.arch_key("block_count", 0) or 0)

    @property
    def context_length(self) -> int | None:
        value = self.arch_key("context_length")
        return int(value) if value is not None else None

    @property
    def n_embd(self) -> int:
        return int(self.arch_key("embedding_length", 0) or 0)

    def _per_layer(self, suffix: str, fallback: int) -> list[int]:
        value = self.arch_key(suffix)
        if value is None:
            return [fallback] * self.n_layers
        if isinstance(value, list):
            return [int(v) for v in value]
        return [int(value)] * self.n_layers

    @property
    def n_head(self) -> list[int]:
        return self._per_layer("attention.head_count", 0)

    @property
    def n_head_kv(self) -> list[int]:
        heads = self.n_head
        value = self.arch_key("attention.head_count_kv")
        if value is None:
            return heads
        return self._per_layer("attention.head_count_kv", 0)

    @property
    def head_dim_k(self) -> int:
        value = self.arch_key("attention.key_length")
        if value:
            return int(value)
        heads = max(self.n_head or [0])
        return self.n_embd // heads if heads else 0

    @property
    def head_dim_v(self) -> int:
        value = self.arch_key("attention.value_length")
        return int(value) if value else self.head_dim_k

    @property
    def sliding_window(self) -> int | None:
        value = self.arch_key("attention.sliding_window")
        return int(value) if value else None

    @property
    def n_vocab(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArrayInfo):
            return tokens.count
        if isinstance(tokens, list):
            return len(tokens)
        return int(self.arch_key("vocab_size", 0) or 0)

    def summary(self) -> dict[str, Any]:
        """The header's facts as plain values (for --json and tables)."""
        return {
            "architecture": self.architecture,
            "name": self.get("general.name"),
            "file_type": self.file_type,
            "parameters": self.n_params,
            "tensor_bytes": self.tensor_bytes,
            "bits_per_weight": round(self.bits_per_weight, 2),
            "context_length": self.context_length,
            "layers": self.n_layers,
            "embedding_length": self.n_embd,
            "heads": max(self.n_head or [0]),
            "kv_heads": max(self.n_head_kv or [0]),
            "head_dim": self.head_dim_k,
            "sliding_window": self.sliding_window,
            "vocab_size": self.n_vocab,
            "tensors": len(self.tensors),
            "parts": self.parts,
            "file_size": self.file_size,
        }


# ---------------------------------------------------------------- ggml types

# ggml type id -> (name, elements per block, bytes per block), as ggml and the
# gguf package define them (tests/test_gguf_header.py checks this table against
# gguf.constants). Kept here so reading a header does not import gguf and numpy
# (0.2 s of every fetch).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

def ggml_type_name(type_id: int) -> str:
    entry = GGML_TYPES.get(type_id)
    return entry[0] if entry else f"type{type_id}"


def file_type_name(file_type: Any, tensors: tuple[TensorInfo, ...] = ()) -> str:
    """``general.file_type`` (llama_ftype) as a name like Q4_K_M; else the commonest tensor type."""
    from .quant_types import FILE_TYPE_NAMES

    if isinstance(file_type, int) and not isinstance(file_type, bool) and file_type in FILE_TYPE_NAMES:
        return FILE_TYPE_NAMES[file_type]
    # Older files lack general.file_type: name them by the type holding most weights.
    by_type: dict[int, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_elements
    if not by_type:
        return "unknown"
    return ggml_type_name(max(by_type, key=by_type.__getitem__))


# ---------------------------------------------------------------- parsing


def _read_string(cur: _Cursor) -> str:
    n = cur.unpack("<Q")
    if n > MAX_STRING:
        raise NotAGGUF(f"{cur.source.name} has an absurd string length ({n:,} bytes) in its header",
                       hint="the file is damaged or not a GGUF model")
    return cur.read(n).decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, vtype: int, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        return _read_string(cur)
    if vtype == _ARRAY and depth == 0:
        item_type = cur.unpack("<I")
        count = cur.unpack("<Q")
        if count > MAX_ARRAY:
            raise NotAGGUF(f"{cur.source.name} has an absurd array length ({count:,}) in its header",
                           hint="the file is damaged or not a GGUF model")
        if count <= KEEP_ARRAY_ITEMS:
            return [_read_value(cur, item_type, depth + 1) for _ in range(count)]
        if item_type in _SCALARS:
            cur.skip(count * struct.calcsize(_SCALARS[item_type]))
        elif item_type == _STRING:
            cur.skip_strings(count)
        else:
            raise NotAGGUF(f"{cur.source.name} has an array of unsupported type {item_type}",
                           hint="the file is damaged or not a GGUF model")
        return ArrayInfo(item_type, count)
    raise NotAGGUF(f"{cur.source.name} has an unknown metadata value type {vtype}",
                   hint="the file is damaged, or newer than this orion understands")


def read_header_part(source: ByteSource) -> GGUFHeader:
    """Parse the header of one GGUF file (one part of a split file)."""
    cur = _Cursor(source)
    if source.size is not None and source.size < 24:
        raise NotAGGUF(f"{source.name} is not a GGUF file ({source.size} bytes)", hint="pass a .gguf model file")
    magic = cur.read(4)
    if magic != GGUF_MAGIC:
        raise NotAGGUF(f"{source.name} is not a GGUF file (it does not start with 'GGUF')",
                       hint="pass a .gguf model file")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise NotAGGUF(f"{source.name} is GGUF version {version}; orion reads versions 2 and 3",
                       hint="convert it with a current llama.cpp")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise NotAGGUF(f"{source.name} claims {n_tensors:,} tensors and {n_kv:,} metadata keys",
                       hint="the file is damaged or not a GGUF model")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _read_string(cur)
        vtype = cur.unpack("<I")
        metadata[key] = _read_value(cur, vtype)

    raw = []
    for _ in range(n_tensors):
        name = _read_string(cur)
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise NotAGGUF(f"{source.name}: tensor {name!r} has {n_dims} dimensions",
                           hint="the file is damaged or not a GGUF model")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        ggml_type = cur.unpack("<I")
        offset = cur.unpack("<Q")
        if ggml_type not in GGML_TYPES:
            raise NotAGGUF(f"{source.name}: tensor {name!r} has unknown type {ggml_type}",
                           hint="the file is damaged, or newer than this orion understands")
        n_el = 1
        for d in shape:
            if d <= 0 or d > 1 << 40:
                raise NotAGGUF(f"{source.name}: tensor {name!r} has an absurd shape {shape}",
                               hint="the file is damaged or not a GGUF model")
            n_el *= d
        _, block, block_bytes = GGML_TYPES[ggml_type]
        if n_el % block:
            raise NotAGGUF(f"{source.name}: tensor {name!r} size is not a whole number of blocks",
                           hint="the file is damaged or not a GGUF model")
        raw.append(TensorInfo(name, shape, ggml_type, offset, n_el // block * block_bytes))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise NotAGGUF(f"{source.name} has an invalid alignment {alignment!r}", hint="the file is damaged")
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    if source.size is not None:
        end = max((data_offset + t.offset + t.n_bytes for t in raw), default=data_offset)
        if end > source.size:
            raise NotAGGUF(
                f"{source.name} is truncated: its tensors need {end:,} bytes, the file has {source.size:,}",
                hint="download it again",
            )
    return GGUFHeader(source.name, version, metadata, tuple(raw), source.size, 1, data_offset)


def merge_parts(parts: list[GGUFHeader]) -> GGUFHeader:
    """One header for a split GGUF: the first part's metadata, every part's tensors."""
    first = parts[0]
    tensors = tuple(t for p in parts for t in p.tensors)
    sizes = [p.file_size for p in parts]
    total = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
    return GGUFHeader(first.name, first.version, first.metadata, tensors, total, len(parts), first.data_offset)


def read_local_header(path: Path) -> GGUFHeader:
    """The header of a local GGUF; for the first part of a split file, of all its parts.

    Cached per file (path, size and modification time of every part): in memory
    for this process, and on disk under ``$ORION_HOME/cache/headers`` so that the
    next command does not walk a 262,144-token vocabulary again (0.1 s a run).
    """
    path = Path(path)
    names = split_part_names(path.name)
    paths = [path.with_name(n) for n in names] if names else [path]
    try:
        stamps = tuple((str(p.absolute()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    except OSError:
        stamps = None
    if stamps is None or path.is_dir():
        return _read_local_header(path)
    return _cached_header(stamps)


@lru_cache(maxsize=32)
def _cached_header(stamps: tuple) -> GGUFHeader:
    import hashlib
    import json

    from .paths import orion_home

    key = hashlib.sha1(repr(stamps).encode()).hexdigest()
    cache = orion_home() / "cache" / "headers" / f"{key}.json"
    try:
        return _header_from_json(json.loads(cache.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    header = _read_local_header(Path(stamps[0][0]))
    try:
        from ._fs import write_text_atomic

        write_text_atomic(cache, json.dumps(_header_to_json(header)))
    except OSError:
        pass  # a read-only home only costs the next command the parse
    return header


def _header_to_json(h: GGUFHeader) -> dict:
    meta = {k: {"__array__": [v.item_type, v.count]} if isinstance(v, ArrayInfo) else v
            for k, v in h.metadata.items()}
    return {"name": h.name, "version": h.version, "metadata": meta, "file_size": h.file_size, "parts": h.parts,
            "data_offset": h.data_offset,
            "tensors": [[t.name, list(t.shape), t.ggml_type, t.offset, t.n_bytes] for t in h.tensors]}


def _header_from_json(d: dict) -> GGUFHeader:
    meta = {k: ArrayInfo(*v["__array__"]) if isinstance(v, dict) and "__array__" in v else v
            for k, v in d["metadata"].items()}
    tensors = tuple(TensorInfo(n, tuple(shape), t, off, nb) for n, shape, t, off, nb in d["tensors"])
    return GGUFHeader(d["name"], d["version"], meta, tensors, d["file_size"], d["parts"], d["data_offset"])


def _read_local_header(path: Path) -> GGUFHeader:
    names = split_part_names(path.name)
    paths = [path.with_name(n) for n in names] if names else [path]
    headers = []
    for p in paths:
        src = LocalFile(p)
        try:
            headers.append(read_header_part(src))
        finally:
            src.close()
    return merge_parts(headers) if len(headers) > 1 else headers[0]
