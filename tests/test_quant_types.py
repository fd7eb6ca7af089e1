"""One home for the quantization types and levels (orion_cli/quant_types.py)."""

from __future__ import annotations

from pathlib import Path

from orion_cli import quant_types as q


def test_tables_agree():
    assert set(q.QUANTIZABLE) <= set(q.FILE_TYPE_IDS)
    assert not set(q.QUANTIZABLE) & set(q.NEEDS_IMATRIX)
    assert set(q.LEVEL_TYPE) == set(q.LEVELS) == set(q.LEVEL_PREFERRED)
    for level, file_type in q.LEVEL_TYPE.items():
        assert file_type in q.QUANTIZABLE and q.LEVEL_PREFERRED[level][0] == file_type
    ranks = [q.quality_rank(q.LEVEL_TYPE[level]) for level in q.LEVELS]
    assert ranks == sorted(ranks, reverse=True)  # q4 below q8 below q16 below q32
    assert q.quality_rank("NOT_A_TYPE") == len(q.QUALITY)
    assert all(q.ALIASES[a] in q.QUALITY for a in q.ALIASES)


def test_no_other_module_keeps_its_own_table():
    """The tables that were in seven places (fetch, engine, quantize, tiers, gguf_header) are gone."""
    package = Path(q.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "quant_types.py":
            continue
        text = path.read_text()
        for sign in ('"q4": "Q4_K_M"', '"Q4_K_M": 15', '"Q4_K_M": 8', '"Q4_K_M": "Q4_K"', '15: "Q4_K_M"'):
            assert sign not in text, (path, sign)
