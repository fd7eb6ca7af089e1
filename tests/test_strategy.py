from dataclasses import replace

import pytest
import yaml

from orion_cli._fs import write_text_atomic
from orion_cli.device import DeviceInfo
from orion_cli.errors import ConfigError, InvalidValue
from orion_cli.budget import Budget, pressure_level
from orion_cli.strategy import build_strategy, load_strategy, read_strategy_file, render_strategy_yaml

GiB = 1024**3


def device(limit=3 * GiB, in_use=0, gpus=()):
    return DeviceInfo(
        ram_total_bytes=limit, ram_available_bytes=limit - in_use, memory_limit_bytes=limit,
        memory_limit_source="test", memory_in_use_bytes=in_use, cgroup=None, cpu_model="Test CPU",
        physical_cores=4, logical_cores=8, usable_cores=8, cpu_flags=("AVX2",), gpus=gpus,
        disk_free_bytes=100 * GiB, disk_path="/", os="Linux", arch="x86_64",
    )


def write_profile(path, dev, tier=None):
    write_text_atomic(path, render_strategy_yaml(build_strategy(dev, tier)))


def test_budget_arithmetic():
    b = Budget.compute(4 * GiB, 1 * GiB, 0.75)
    assert b.budget_bytes == 2 * GiB
    assert b.arithmetic() == "4.0 GiB limit × 0.75 (high-pressure line) − 1.0 GiB in use now = 2.0 GiB"
    # a machine already past the high-pressure line has no budget, never a negative one
    assert Budget.compute(4 * GiB, 3.5 * GiB, 0.75).budget_bytes == 0


def test_pressure_levels():
    assert pressure_level(50, 100, 0.75, 0.9) == "normal"
    assert pressure_level(75, 100, 0.75, 0.9) == "normal"
    assert pressure_level(76, 100, 0.75, 0.9) == "high"
    assert pressure_level(91, 100, 0.75, 0.9) == "critical"


def test_build_strategy_balanced():
    s = build_strategy(device(3 * GiB))
    assert (s.tier, s.quantization, s.max_models, s.keep_alive_s) == ("balanced", "q4", 2, 300)
    assert s.memory_budget_bytes == int(3 * GiB * 0.75)
    assert s.threads == 4  # one per physical core
    assert s.n_gpu_layers == 0 and s.gpu_budget_bytes is None


def test_build_strategy_with_gpu_and_forced_tier():
    from orion_cli.device import GPUInfo

    s = build_strategy(device(16 * GiB, gpus=(GPUInfo(0, "GPU", 8 * GiB, 7 * GiB),)), "aggressive")
    assert s.tier == "aggressive" and "forced" in s.tier_reason
    assert s.n_gpu_layers == "auto"
    assert s.gpu_budget_bytes == int(8 * GiB * 0.75) - 1 * GiB


def test_yaml_is_commented_and_round_trips(tmp_path):
    path = tmp_path / "strategy.yaml"
    s = build_strategy(device(6 * GiB, in_use=1 * GiB))
    text = render_strategy_yaml(s)
    assert text.count("\n#") >= 10  # human-editable: every setting explained
    doc = yaml.safe_load(text)
    assert doc["schema_version"] == 1
    assert doc["device"]["cpu_model"] == "Test CPU"
    write_text_atomic(path, text)
    back = read_strategy_file(path)
    for key in ("tier", "quantization", "max_models", "keep_alive_s", "n_ctx", "kv_type", "threads",
                "memory_budget_bytes"):
        assert back[key] == getattr(s, key)


def test_minimal_tier_keep_alive_never_round_trips(tmp_path):
    path = tmp_path / "s.yaml"
    write_profile(path, device(16 * GiB))
    assert "keep_alive_s: null" in path.read_text()
    s = load_strategy(path=path, env={})
    assert s.tier == "minimal" and s.keep_alive_s is None


# ---------------------------------------------------------------- precedence


def test_precedence_flag_over_env_over_file_over_tier(tmp_path):
    path = tmp_path / "s.yaml"
    write_profile(path, device(3 * GiB))  # balanced: max_models 2, n_ctx 4096
    text = path.read_text().replace("n_ctx: 4096", "n_ctx: 3000")
    path.write_text(text)

    s = load_strategy(path=path, env={})
    assert (s.max_models, s.n_ctx, s.keep_alive_s) == (2, 3000, 300)
    assert s.sources["n_ctx"] == "file" and s.sources["max_models"] == "file"

    env = {"ORION_MAX_MODELS": "4", "ORION_CTX": "1024"}
    s = load_strategy(path=path, env=env)
    assert (s.max_models, s.n_ctx) == (4, 1024)
    assert s.sources["max_models"] == "env ORION_MAX_MODELS"

    s = load_strategy({"max_models": 1, "n_ctx": None}, path=path, env=env)
    assert (s.max_models, s.n_ctx) == (1, 1024)
    assert s.sources["max_models"] == "flag"


def test_tier_without_file_comes_from_the_device(tmp_path):
    s = load_strategy(path=tmp_path / "none.yaml", env={}, device_probe=lambda: device(1 * GiB))
    assert (s.tier, s.max_models, s.keep_alive_s) == ("aggressive", 1, 60)
    assert s.sources["tier"] == "device" and s.sources["max_models"] == "tier"
    assert s.memory_budget_bytes == int(1 * GiB * 0.75)


def test_switching_tier_brings_that_tiers_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    write_profile(path, device(3 * GiB))  # balanced
    s = load_strategy(path=path, env={"ORION_TIER": "light"})
    assert (s.tier, s.quantization, s.max_models, s.keep_alive_s) == ("light", "q8", 3, 600)
    assert s.sources["quantization"] == "tier"
    # the device settings still come from the file
    assert s.memory_budget_bytes == int(3 * GiB * 0.75) and s.sources["memory_budget_bytes"] == "file"
    # a flag beats the environment for the tier too
    s = load_strategy({"tier": "minimal"}, path=path, env={"ORION_TIER": "light"})
    assert (s.tier, s.keep_alive_s) == ("minimal", None)
    # and a setting given beside the tier switch still wins
    s = load_strategy(path=path, env={"ORION_TIER": "light", "ORION_MAX_MODELS": "1"})
    assert s.max_models == 1


def test_env_values_are_parsed(tmp_path):
    env = {"ORION_KEEP_ALIVE": "5m", "ORION_MEMORY_BUDGET": "2GB", "ORION_QUANT": "Q8"}
    s = load_strategy(path=tmp_path / "none.yaml", env=env, device_probe=lambda: device())
    assert (s.keep_alive_s, s.memory_budget_bytes, s.quantization) == (300, 2 * GiB, "q8")
    s = load_strategy(path=tmp_path / "none.yaml", env={"ORION_KEEP_ALIVE": "never"}, device_probe=lambda: device())
    assert s.keep_alive_s is None


@pytest.mark.parametrize(
    "var,value,expected",
    [
        ("ORION_MAX_MODELS", "two", "ORION_MAX_MODELS='two' is not valid: expected a whole number ≥ 1"),
        ("ORION_TIER", "huge", "ORION_TIER='huge' is not valid: expected one of aggressive, balanced, light, minimal"),
        ("ORION_KEEP_ALIVE", "soon", "ORION_KEEP_ALIVE='soon' is not valid"),
        ("ORION_MEMORY_BUDGET", "lots", "ORION_MEMORY_BUDGET='lots' is not valid"),
    ],
)
def test_bad_env_values(tmp_path, var, value, expected):
    with pytest.raises(ConfigError) as info:
        load_strategy(path=tmp_path / "none.yaml", env={var: value}, device_probe=lambda: device())
    assert info.value.one_line().startswith(expected)


def test_bad_flag_value_is_a_usage_error(tmp_path):
    with pytest.raises(InvalidValue, match="--max-models 0 is not valid"):
        load_strategy({"max_models": 0}, path=tmp_path / "none.yaml", env={}, device_probe=lambda: device())


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    "text,expected",
    [
        ("tier: [balanced\n", "is not valid YAML at line"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("schema_version: 99\ntier: balanced\n", "has schema_version 99, this orion reads 1"),
        ("tier: balanced\n", "has schema_version null"),
        ("schema_version: 1\nmax_models: two\n", "max_models must be a whole number ≥ 1, not 'two'"),
        ("schema_version: 1\nmax_models: true\n", "max_models must be a whole number ≥ 1, not true"),
        ("schema_version: 1\ntier: huge\n", "tier must be one of aggressive, balanced, light, minimal, not 'huge'"),
        ("schema_version: 1\nquantization: q5\n", "quantization must be one of q4, q8, q16, q32, not 'q5'"),
        ("schema_version: 1\nkeep_alive_s: [1]\n", "keep_alive_s must be seconds"),
        ("schema_version: 1\nkv_type: q5_1\n", "kv_type must be one of f16, q8_0, q4_0 (for K and V), or K/V such as "
                                                "q8_0/q4_0, not 'q5_1'"),
        ("schema_version: 1\nmax_model: 3\n", "unknown key 'max_model'"),
        ("schema_version: 1\npressure: {high: 2}\n", "pressure.high must be a fraction between 0 and 1, not 2"),
    ],
)
def test_broken_strategy_file(tmp_path, text, expected):
    path = tmp_path / "strategy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_strategy(path=path, env={}, device_probe=lambda: device())
    line = info.value.one_line()
    assert expected in line
    assert str(path) in line and "orion profile" in line
    assert "\n" not in line


def test_hand_edited_values_are_accepted(tmp_path):
    path = tmp_path / "strategy.yaml"
    path.write_text("schema_version: 1\ntier: light\nkeep_alive_s: 10m\nmemory_budget_bytes: 3GB\n")
    s = load_strategy(path=path, env={}, device_probe=lambda: device())
    assert (s.tier, s.keep_alive_s, s.memory_budget_bytes, s.max_models) == ("light", 600, 3 * GiB, 3)


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "strategy.yaml"
    write_text_atomic(path, "a: 1\n")
    write_text_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["strategy.yaml"]


def test_strategy_is_a_frozen_value():
    s = build_strategy(device())
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        s.tier = "light"  # type: ignore[misc]
    assert replace(s, tier="light").tier == "light"


def test_write_text_atomic_replaces_only_regular_files(tmp_path):
    """A device, a FIFO or a folder at the path is refused, never replaced; a link is followed."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, "/dev/null"):
        with pytest.raises(InvalidValue, match="only writes regular files"):
            write_text_atomic(path, "x")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    target = tmp_path / "real.yaml"
    target.write_text("old")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_bad_flag_values_name_the_flags_that_exist(tmp_path):
    """Errors name the command line's flags (--ctx, --quant...), not the settings' keys (--n-ctx)."""
    from orion_cli.strategy import load_strategy

    for key, flag in (("n_ctx", "--ctx"), ("quantization", "--quant"), ("keep_alive_s", "--keep-alive"),
                      ("n_gpu_layers", "--gpu-layers"), ("threads", "--threads"), ("kv_type", "--kv-type")):
        with pytest.raises(InvalidValue) as info:
            load_strategy({key: "nonsense"}, path=tmp_path / "none.yaml", env={}, device_probe=lambda: device())
        assert info.value.message.startswith(f"{flag} 'nonsense'"), info.value.message
