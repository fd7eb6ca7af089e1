import pytest

from orion_cli.errors import InvalidValue
from orion_cli.tiers import GB, builtin_tiers


def test_builtin_tiers_hold_the_design_notes_numbers():
    table = builtin_tiers()
    got = {t.name: (t.max_memory_bytes, t.quantization, t.max_models, t.keep_alive_s) for t in table.tiers}
    assert got == {
        "aggressive": (2 * GB, "q4", 1, 60),
        "balanced": (4 * GB, "q4", 2, 300),
        "light": (8 * GB, "q8", 3, 600),
        "minimal": (None, "q16", 5, None),
    }
    assert (table.pressure_high, table.pressure_critical) == (0.75, 0.90)


def test_tiers_short_of_memory_take_a_q8_0_kv_cache():
    """q8_0 holds the KV cache in 34/64 of f16's bytes: the two smallest tiers take it; q4_0 is offered
    (--kv-type, ORION_KV_TYPE) but no tier's default."""
    assert {t.name: t.kv_type for t in builtin_tiers().tiers} == {
        "aggressive": ("q8_0", "q8_0"), "balanced": ("q8_0", "q8_0"),
        "light": ("f16", "f16"), "minimal": ("f16", "f16"),
    }


@pytest.mark.parametrize(
    "limit,tier",
    [
        (512 * 1024**2, "aggressive"),
        (2 * GB - 1, "aggressive"),
        (2 * GB, "aggressive"),  # "≤ 2 GB" includes 2 GB exactly
        (2 * GB + 1, "balanced"),
        (3 * GB, "balanced"),
        (4 * GB, "balanced"),
        (4 * GB + 1, "light"),
        (6 * GB, "light"),
        (8 * GB, "light"),
        (8 * GB + 1, "minimal"),
        (16 * GB, "minimal"),
        (1024 * GB, "minimal"),
    ],
)
def test_tier_boundaries(limit, tier):
    chosen, reason = builtin_tiers().for_memory(limit)
    assert chosen.name == tier
    assert "memory limit" in reason


def test_reason_names_the_span():
    assert builtin_tiers().for_memory(3 * GB)[1] == "memory limit 3.0 GiB is over 2 GB and at most 4 GB"
    assert builtin_tiers().for_memory(16 * GB)[1] == "memory limit 16.0 GiB is over 8 GB"


def test_unknown_tier():
    with pytest.raises(InvalidValue, match="unknown tier 'huge'"):
        builtin_tiers().get("huge")
    assert builtin_tiers().get(" Light ").name == "light"
