"""The KV cache's types in the strategy (kv_type): parsing, precedence, the tiers' defaults, the
estimate, and what llama.cpp really allocates when a model loads with them."""

import json
import re

import pytest
import yaml
from conftest import assert_clean_error

from orion_cli.device import DeviceInfo
from orion_cli.errors import ConfigError, InvalidValue
from orion_cli.setting_values import format_kv_type, parse_kv_type
from orion_cli.strategy import build_strategy, load_strategy, render_strategy_yaml

GiB = 1024**3
MiB = 1024**2
CHOICES = "one of f16, q8_0, q4_0 (for K and V), or K/V such as q8_0/q4_0"


def device(limit=3 * GiB):
    """A CPU-only device of ``limit`` bytes; the tier follows from it, never from this machine."""
    return DeviceInfo(
        ram_total_bytes=limit, ram_available_bytes=limit, memory_limit_bytes=limit, memory_limit_source="test",
        memory_in_use_bytes=0, cgroup=None, cpu_model="Test CPU", physical_cores=2, logical_cores=2,
        usable_cores=2, cpu_flags=(), gpus=(), disk_free_bytes=100 * GiB, disk_path="/", os="Linux", arch="x86_64",
    )


@pytest.mark.parametrize("text,pair", [
    ("q8_0", ("q8_0", "q8_0")),
    ("f16", ("f16", "f16")),
    ("q8_0/q4_0", ("q8_0", "q4_0")),
    (" Q8_0 / F16 ", ("q8_0", "f16")),
    ("q4_0/q4_0", ("q4_0", "q4_0")),
])
def test_parse_and_format(text, pair):
    assert parse_kv_type(text) == pair
    assert parse_kv_type(format_kv_type(pair)) == pair
    assert format_kv_type(("q8_0", "q8_0")) == "q8_0" and format_kv_type(("q8_0", "q4_0")) == "q8_0/q4_0"


@pytest.mark.parametrize("value", ["q5_1", "bf16", "", "q8_0/", "/q8_0", "q8_0/q4_0/f16", "q8", 8, None, ["q8_0"]])
def test_bad_values_are_refused_with_the_choices(value):
    with pytest.raises(ValueError, match=re.escape(CHOICES)):
        parse_kv_type(value)


# ---------------------------------------------------------------- precedence: flag > env > file > tier


def test_precedence_flag_over_env_over_file_over_tier(tmp_path):
    none = tmp_path / "none.yaml"
    s = load_strategy(path=none, env={}, device_probe=lambda: device(3 * GiB))  # balanced
    assert s.kv_type == ("q8_0", "q8_0") and s.sources["kv_type"] == "tier"

    path = tmp_path / "s.yaml"
    path.write_text(render_strategy_yaml(build_strategy(device(3 * GiB))).replace("kv_type: q8_0", "kv_type: f16"))
    s = load_strategy(path=path, env={})
    assert s.kv_type == ("f16", "f16") and s.sources["kv_type"] == "file"

    env = {"ORION_KV_TYPE": "q4_0"}
    s = load_strategy(path=path, env=env)
    assert s.kv_type == ("q4_0", "q4_0") and s.sources["kv_type"] == "env ORION_KV_TYPE"

    s = load_strategy({"kv_type": "q8_0/q4_0"}, path=path, env=env)
    assert s.kv_type == ("q8_0", "q4_0") and s.sources["kv_type"] == "flag"
    assert s.to_dict()["kv_type"] == "q8_0/q4_0"
    s = load_strategy({"kv_type": None}, path=path, env=env)  # a flag not given
    assert s.sources["kv_type"] == "env ORION_KV_TYPE"


def test_kv_type_follows_the_tier(tmp_path):
    """Switching tiers brings that tier's KV type, as it brings its n_ctx, unless given at that level."""
    path = tmp_path / "s.yaml"
    path.write_text(render_strategy_yaml(build_strategy(device(3 * GiB))))  # balanced: kv_type q8_0 in the file
    s = load_strategy(path=path, env={"ORION_TIER": "minimal"})
    assert s.kv_type == ("f16", "f16") and s.sources["kv_type"] == "tier"
    s = load_strategy({"tier": "aggressive"}, path=path, env={"ORION_TIER": "minimal"})
    assert s.kv_type == ("q8_0", "q8_0")
    s = load_strategy(path=path, env={"ORION_TIER": "minimal", "ORION_KV_TYPE": "q4_0/f16"})
    assert s.kv_type == ("q4_0", "f16")


def test_the_file_round_trips_and_old_files_get_the_tiers(tmp_path):
    path = tmp_path / "s.yaml"
    strategy = build_strategy(device(1 * GiB))
    text = render_strategy_yaml(strategy)
    assert "kv_type: q8_0" in text and "[ORION_KV_TYPE]" in text
    path.write_text(text.replace("kv_type: q8_0", "kv_type: f16/q8_0"))
    assert load_strategy(path=path, env={}).kv_type == ("f16", "q8_0")
    # a strategy file written before kv_type existed: the tier's
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("kv_type")) + "\n")
    s = load_strategy(path=path, env={})
    assert s.kv_type == ("q8_0", "q8_0") and s.sources["kv_type"] == "tier"


def test_bad_flag_env_and_file_values(tmp_path):
    none = tmp_path / "none.yaml"
    with pytest.raises(InvalidValue) as info:
        load_strategy({"kv_type": "q5_1"}, path=none, env={}, device_probe=lambda: device())
    assert info.value.one_line() == f"--kv-type 'q5_1' is not valid: expected {CHOICES}"
    with pytest.raises(ConfigError) as info:
        load_strategy(path=none, env={"ORION_KV_TYPE": "q8_0/q2_k"}, device_probe=lambda: device())
    assert info.value.one_line().startswith(f"ORION_KV_TYPE='q8_0/q2_k' is not valid: expected {CHOICES}")
    path = tmp_path / "s.yaml"
    path.write_text("schema_version: 1\nkv_type: q5_1\n")
    with pytest.raises(ConfigError) as info:
        load_strategy(path=path, env={})
    assert f"kv_type must be {CHOICES}, not 'q5_1'" in info.value.message


def test_bad_values_on_the_command_line(orion, gemma_q4):
    # a usage error (2) for the flag, before any load; configuration (3) for the variable
    proc = orion("run", str(gemma_q4), "Hi", "--kv-type", "q5_1")
    assert_clean_error(proc, "--kv-type 'q5_1' is not valid", CHOICES, code=2)
    assert_clean_error(orion("inspect", str(gemma_q4), "--kv-type", "fp8"), "--kv-type 'fp8'", code=2)
    assert_clean_error(orion("strategy", env={"ORION_KV_TYPE": "q8_0/q4_0/f16"}),
                       "ORION_KV_TYPE='q8_0/q4_0/f16' is not valid", CHOICES, code=3)


def test_strategy_command_shows_it_with_its_source(orion):
    assert orion("profile", "--ram", "3GB").returncode == 0
    data = json.loads(orion("strategy", "--json").stdout)
    assert (data["settings"]["kv_type"], data["sources"]["kv_type"]) == ("q8_0", "file")
    data = json.loads(orion("strategy", "--json", env={"ORION_KV_TYPE": "q4_0"}).stdout)
    assert (data["settings"]["kv_type"], data["sources"]["kv_type"]) == ("q4_0", "env ORION_KV_TYPE")
    data = json.loads(orion("strategy", "--kv-type", "q8_0/f16", "--json", env={"ORION_KV_TYPE": "q4_0"}).stdout)
    assert (data["settings"]["kv_type"], data["sources"]["kv_type"]) == ("q8_0/f16", "flag")


# ---------------------------------------------------------------- the tiers' defaults


# (the tier table's own values: tests/test_tiers.py)


@pytest.mark.parametrize("ram,tier,kv_type", [("1GB", "aggressive", "q8_0"), ("3GB", "balanced", "q8_0"),
                                              ("6GB", "light", "f16"), ("16GB", "minimal", "f16")])
def test_profile_writes_and_teaches_the_tiers_kv_type(orion, ram, tier, kv_type):
    """Simulated memory: the tier, and so the KV type, never depends on this machine."""
    doc = yaml.safe_load(orion("profile", "--ram", ram, "--output", "-").stdout)
    assert (doc["tier"], doc["kv_type"]) == (tier, kv_type)
    proc = orion("profile", "--ram", ram)
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("KV cache")]
    assert f"{kv_type}, the {tier} tier's default" in line
    for word in ("f16 100%", "q8_0 53%", "q4_0 28%", "--kv-type", "ORION_KV_TYPE", "K/V"):
        assert word in line, line


@pytest.mark.parametrize("command", ["run", "serve", "inspect", "fetch", "strategy"])
def test_help_teaches_the_flag(orion, command):
    proc = orion(command, "--help")
    assert proc.returncode == 0
    # the option's help, joined from the lines --help wraps it into
    text = proc.stdout.split("--kv-type TYPE[/TYPE]", 1)[1].split("\n  -", 1)[0]
    text = " ".join(text.split())
    assert text.startswith("KV cache type"), text
    for word in ("f16", "q8_0", "q4_0", "K/V", "Default: the tier's"):
        assert word in text, text


# ---------------------------------------------------------------- the estimate and the plan


@pytest.fixture(scope="module")
def gemma_header(gemma_q4):
    from orion_cli.gguf_header import read_local_header

    return read_local_header(gemma_q4)


@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
def test_q8_0_cache_is_34_64_of_f16(gemma_header, engine_verdict, n_ctx):
    from orion_cli.engine import settings_for
    from orion_cli.engine.settings import kv_settings
    from orion_cli.estimate import estimate_memory

    base = settings_for(engine_verdict)
    f16 = estimate_memory(gemma_header, n_ctx, kv_settings(base, "f16", "f16")).kv_bytes
    q8 = estimate_memory(gemma_header, n_ctx, kv_settings(base, "q8_0", "q8_0")).kv_bytes
    q4 = estimate_memory(gemma_header, n_ctx, kv_settings(base, "q4_0", "q4_0")).kv_bytes
    assert q8 * 64 == f16 * 34 and q4 * 64 == f16 * 18
    mixed = estimate_memory(gemma_header, n_ctx, kv_settings(base, "q8_0", "f16")).kv_bytes
    assert mixed * 128 == f16 * (34 + 64)


def test_inspect_estimates_with_the_strategys_types(orion, gemma_q4):
    def kv(*args, env=None):
        proc = orion("inspect", str(gemma_q4), "--ctx", "2048", "--json", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["estimate"]["parts"]["KV cache"]

    f16, q8 = kv("--kv-type", "f16"), kv("--kv-type", "q8_0")
    assert q8["bytes"] * 64 == f16["bytes"] * 34 and "q8_0" in q8["how"]
    assert kv(env={"ORION_KV_TYPE": "q8_0/f16"})["bytes"] * 128 == f16["bytes"] * (34 + 64)
    assert orion("profile", "--ram", "3GB").returncode == 0  # balanced: q8_0 from the tier
    assert kv() == q8


def test_the_plan_and_the_load_get_the_strategys_types(gemma_header, engine_verdict, tmp_path):
    """offload_plan hands the same types to the estimate and to the load; an encoder keeps f16."""
    from orion_cli.engine import machine_settings, settings_for
    from orion_cli.estimate import estimate_memory
    from orion_cli.placement import offload_plan

    strategy = load_strategy({"kv_type": "q8_0/q4_0"}, path=tmp_path / "none.yaml", env={},
                             device_probe=lambda: device(16 * GiB))
    plan, settings = offload_plan(gemma_header, 2048, strategy, engine_verdict, gpu_budgets=[])
    assert (settings.type_k, settings.type_v) == ("q8_0", "q4_0")
    assert settings.flash_attn  # llama.cpp quantizes V only with flash attention
    assert plan.cpu.kv_bytes == estimate_memory(gemma_header, 2048, settings).kv_bytes
    encoder = offload_plan(gemma_header, 512, strategy, engine_verdict, embedding=True, gpu_budgets=[])[1]
    assert (encoder.type_k, encoder.type_v) == ("f16", "f16")
    assert encoder == settings_for(engine_verdict, embedding=True)
    # the estimates made without a load (list, inspect, fetch) take the strategy's types too
    assert (machine_settings(kv_type=("q4_0", "q8_0")).type_k, machine_settings(kv_type=("q4_0", "q8_0")).type_v) \
        == ("q4_0", "q8_0")
    assert machine_settings(embedding=True, kv_type=("q8_0", "q8_0")).type_v == "f16"


# ---------------------------------------------------------------- a real load


KV_LINE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB .*K \((\w+)\): +[0-9.]+ MiB, V \((\w+)\)")


@pytest.mark.parametrize("how,expected", [
    (("--kv-type", "q8_0"), ("q8_0", "q8_0")),
    ({"ORION_KV_TYPE": "q4_0/q8_0"}, ("q4_0", "q8_0")),
    ("tier", ("q8_0", "q8_0")),  # the balanced tier's default reaches the load
])
def test_llama_cpp_allocates_the_types_asked_for(orion, gemma_q4, gemma_header, engine_verdict, how, expected):
    """llama.cpp's own log (--debug) says which types it gave the KV cache, and its size matches the
    estimate's KV part."""
    from orion_cli.engine import settings_for
    from orion_cli.engine.settings import kv_settings
    from orion_cli.estimate import estimate_memory

    args, env = (), None
    if how == "tier":
        assert orion("profile", "--ram", "3GB").returncode == 0
    elif isinstance(how, dict):
        env = how
    else:
        args = how
    proc = orion("--debug", "run", str(gemma_q4), "The capital of France is Paris. The capital of Germany is",
                 "--ctx", "1024", "--temperature", "0", "--max-tokens", "4", "--local", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Berlin" in proc.stdout
    caches = KV_LINE.findall(proc.stderr)
    assert len(caches) == 2, proc.stderr[-3000:]  # gemma3: the global layers' cache and the sliding window's
    assert {(k, v) for _, k, v in caches} == {expected}
    kv = estimate_memory(gemma_header, 1024, kv_settings(settings_for(engine_verdict), *expected)).kv_bytes
    assert sum(float(size) for size, _, _ in caches) == pytest.approx(kv / MiB, abs=0.01)
