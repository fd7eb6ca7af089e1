"""The GGUF header reader: real files, split files, remote reads, and every kind of bad input."""

import struct

import numpy as np
import pytest
from conftest import LADDER_REPO

from orion_cli.errors import NotAGGUF, NotFound
from orion_cli.gguf_files import group_gguf_files
from orion_cli.gguf_files import split_part_names
from orion_cli.gguf_header import read_local_header


def test_real_header(gemma_q4):
    h = read_local_header(gemma_q4)
    s = h.summary()
    assert (s["architecture"], s["file_type"], s["layers"], s["heads"], s["kv_heads"], s["head_dim"]) == \
        ("gemma3", "Q4_K_M", 18, 4, 1, 256)
    assert (s["context_length"], s["embedding_length"], s["sliding_window"], s["vocab_size"]) == (32768, 640, 512, 262144)
    assert s["parameters"] == 268_098_176
    assert h.tensor_bytes <= gemma_q4.stat().st_size


def test_file_type_is_read_from_the_header_not_the_name(gemma_ladder, tmp_path):
    misleading = tmp_path / "model-Q2_K.gguf"
    misleading.symlink_to(gemma_ladder["Q8_0"])
    assert read_local_header(misleading).file_type == "Q8_0"
    assert read_local_header(gemma_ladder["F16"]).file_type == "F16"


def test_remote_header_equals_local_and_reads_little(hub, gemma_ladder):
    from orion_cli import hub as hub_mod

    listing = hub_mod.list_files(LADDER_REPO)
    name = "gemma-3-270m-F16.gguf"
    remote = hub_mod.read_remote_header(LADDER_REPO, name, listing.get(name).size)
    local = read_local_header(gemma_ladder["F16"])
    assert remote.summary() | {"file_size": None} == local.summary() | {"file_size": None}
    assert hub.sent(name) < gemma_ladder["F16"].stat().st_size * 0.05
    assert all(r and r.startswith("bytes=") for m, p, r in hub.requests if m == "GET" and p.endswith(name))


def _write_split(tmp_path, n_parts=2):
    """A tiny two-part split GGUF written with the gguf package (random weights)."""
    import gguf

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_parts):
        path = tmp_path / f"tiny-{i + 1:05d}-of-{n_parts:05d}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        if i == 0:
            w.add_block_count(2)
            w.add_context_length(256)
            w.add_embedding_length(64)
            w.add_head_count(4)
        w.add_uint16("split.no", i)
        w.add_uint16("split.count", n_parts)
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((128, 64)).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(path)
    return paths


def test_split_file_counts_every_part(tmp_path):
    paths = _write_split(tmp_path)
    h = read_local_header(paths[0])
    assert h.parts == 2
    assert len(h.tensors) == 2
    assert h.n_params == 2 * 128 * 64
    assert h.file_size == sum(p.stat().st_size for p in paths)
    assert split_part_names("x-00001-of-00003.gguf") == ["x-00001-of-00003.gguf", "x-00002-of-00003.gguf",
                                                         "x-00003-of-00003.gguf"]
    groups = group_gguf_files(["m-00002-of-00002.gguf", "m-00001-of-00002.gguf", "mmproj-f16.gguf", "a.gguf"])
    assert groups == [("a.gguf",), ("m-00001-of-00002.gguf", "m-00002-of-00002.gguf")]


def test_missing_split_part(tmp_path):
    paths = _write_split(tmp_path)
    paths[1].unlink()
    with pytest.raises(NotFound, match="no such file"):
        read_local_header(paths[0])


# ---------------------------------------------------------------- bad input never reaches llama.cpp


def header_bytes(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize(
    "data,message",
    [
        (bytes(range(256)) * 8, "does not start with 'GGUF'"),
        (b"GGUF", "is not a GGUF file"),
        (header_bytes(version=1) + b"\0" * 64, "GGUF version 1"),
        (header_bytes(n_tensors=1 << 40) + b"\0" * 64, "claims"),
        (header_bytes(n_kv=1) + struct.pack("<Q", 1 << 40) + b"\0" * 64, "absurd string length"),
        (header_bytes(n_kv=1) + struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 4, 1 << 45) + b"\0" * 64,
         "absurd array length"),
        (header_bytes(n_kv=1) + struct.pack("<Q", 3) + b"key" + struct.pack("<I", 99) + b"\0" * 64,
         "unknown metadata value type"),
        (header_bytes(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + b"\0" * 64, "dimensions"),
        (header_bytes(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 1 << 30, 0, 0),
         "truncated"),
    ],
)
def test_bad_files_are_clean_errors(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(NotAGGUF, match=message):
        read_local_header(path)


def test_truncated_real_file(gemma_q4, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gemma_q4, "rb") as f:
        cut.write_bytes(f.read(gemma_q4.stat().st_size // 2))
    with pytest.raises(NotAGGUF, match="truncated"):
        read_local_header(cut)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(NotAGGUF, match="is a directory"):
        read_local_header(tmp_path)
    with pytest.raises(NotFound):
        read_local_header(tmp_path / "missing.gguf")


def test_type_tables_match_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES, LlamaFileType

    from orion_cli.gguf_header import GGML_TYPES
    from orion_cli.quant_types import FILE_TYPE_NAMES as FILE_TYPES

    ours = {tid: (name, block, size) for tid, (name, block, size) in GGML_TYPES.items()}
    theirs = {int(k): (k.name, v[0], v[1]) for k, v in GGML_QUANT_SIZES.items()}
    assert ours == theirs
    names = {int(x): x.name.removeprefix("MOSTLY_").removeprefix("ALL_") for x in LlamaFileType if x.name != "GUESSED"}
    assert FILE_TYPES == names


def test_header_cache_on_disk(gemma_q4, tmp_path, orion_home):
    import shutil

    from orion_cli import gguf_header

    copy = tmp_path / "g.gguf"
    shutil.copy(gemma_q4, copy)
    first = read_local_header(copy)
    files = list((orion_home / "cache" / "headers").glob("*.json"))
    assert len(files) == 1
    gguf_header._cached_header.cache_clear()  # a new process: only the disk cache remains
    again = read_local_header(copy)
    assert again == first and again.summary() == first.summary()
    # a changed file is parsed again, never served from the cache
    with open(copy, "r+b") as f:
        f.seek(0)
        f.write(b"XXXX")
    with pytest.raises(NotAGGUF):
        read_local_header(copy)
