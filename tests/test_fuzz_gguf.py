"""Fuzzing the GGUF header reader (Hypothesis): mutated real headers and generated ones, with
hostile counts, lengths, types, shapes and offsets. Every input gives a header or NotAGGUF, never
another exception, within a time bound and without a large allocation.

`make test` runs about 10,000 inputs (ORION_FUZZ_EXAMPLES=3300 for each of three tests, and a
fiftieth of that on gemma3-270m's 4 MB header); `make fuzz` runs 100,000 (docs/reliability.md)."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_cli.errors import NotAGGUF
from orion_cli.gguf_header import GGML_TYPES, read_header_part, read_local_header

EXAMPLES = int(os.environ.get("ORION_FUZZ_EXAMPLES", "3300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("ORION_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 64 << 20


class Bytes:
    """An in-memory ByteSource (a local file or a remote one, as the reader sees it)."""

    def __init__(self, data: bytes, size_known: bool = True) -> None:
        self.data, self.name = data, "fuzz.gguf"
        self.size = len(data) if size_known else None

    def read_at(self, offset: int, n: int) -> bytes:
        return self.data[offset: offset + n]


def parse(data: bytes, size_known: bool = True, check_memory: bool = True) -> None:
    """The property: a header or NotAGGUF, fast, small (tracemalloc's peak while parsing)."""
    if check_memory:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        read_header_part(Bytes(data, size_known))
    except NotAGGUF:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1] if check_memory else 0
        if check_memory:
            tracemalloc.stop()
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert peak < MEMORY_LIMIT + 2 * len(data), peak


def _head(path) -> bytes:
    """A file's header bytes (up to its data) and a little data."""
    header = read_local_header(path)
    with open(path, "rb") as f:
        return f.read(header.data_offset + 4096)


@pytest.fixture(scope="module")
def real_header(tmp_path_factory) -> bytes:
    """A real, small GGUF's header: the engine canary's llama (Q4_0, byte vocabulary), as orion writes it."""
    from orion_cli.tinymodel import write_tiny_llama

    return _head(write_tiny_llama(tmp_path_factory.mktemp("fuzz") / "tiny.gguf"))


@pytest.fixture(scope="module")
def gemma_header(gemma_q4) -> bytes:
    """gemma3-270m's header: 262,144 vocabulary strings (4 MB)."""
    return _head(gemma_q4)


# ---------------------------------------------------------------- mutations of a real header


@FUZZ
@given(data=st.data())
def test_mutated_real_header(real_header, data):
    raw = bytearray(real_header)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        kind = data.draw(st.sampled_from(["flip", "u64", "cut", "insert"]))
        if kind == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif kind == "u64":  # a hostile count, length, dimension or offset
            value = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]))
            raw[at: at + 8] = struct.pack("<Q", value)
        elif kind == "cut":
            del raw[at:]
            if not raw:
                raw = bytearray(b"G")
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    parse(bytes(raw), size_known=data.draw(st.booleans()))


@settings(max_examples=max(20, EXAMPLES // 50), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 5_000_000), flip=st.integers(0, 5_000_000))
def test_truncated_and_flipped_large_header(gemma_header, cut, flip):
    raw = bytearray(gemma_header[: min(cut, len(gemma_header))] or b"G")
    raw[flip % len(raw)] ^= 0xFF
    parse(bytes(raw), check_memory=False)


# ---------------------------------------------------------------- generated headers


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


values = st.one_of(
    st.tuples(st.just(4), st.integers(0, 2**32 - 1).map(lambda v: struct.pack("<I", v))),
    st.tuples(st.just(8), st.binary(max_size=64).map(_string)),
    st.tuples(st.just(9), st.tuples(st.sampled_from([4, 8, 9, 99]), st.integers(0, 2**64 - 1))
              .map(lambda t: struct.pack("<IQ", *t))),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=16)),
)


@FUZZ
@given(n_tensors=st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1)),
       n_kv=st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1)),
       kvs=st.lists(st.tuples(st.binary(max_size=24), values), max_size=4),
       tensors=st.lists(st.tuples(st.binary(max_size=24), st.lists(st.integers(0, 2**64 - 1), max_size=5),
                                  st.sampled_from(sorted(GGML_TYPES) + [99, 2**32 - 1]), st.integers(0, 2**64 - 1)),
                        max_size=4),
       version=st.sampled_from([1, 2, 3, 4]), tail=st.binary(max_size=256))
def test_generated_header(n_tensors, n_kv, kvs, tensors, version, tail):
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    for key, (vtype, payload) in kvs:
        out += _string(key) + struct.pack("<I", vtype) + payload
    for name, dims, ggml_type, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    parse(out + tail)


@FUZZ
@given(blob=st.binary(max_size=512))
def test_random_bytes(blob):
    parse(blob)
    parse(b"GGUF" + blob)
