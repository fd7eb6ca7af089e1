"""`orion profile` and `orion strategy` as a user runs them: whole processes."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import assert_clean_error

GiB = 1024**3


@pytest.mark.parametrize(
    "ram,tier,quant,models,keep_alive",
    [
        ("1GB", "aggressive", "q4", 1, 60),
        ("3GB", "balanced", "q4", 2, 300),
        ("6GB", "light", "q8", 3, 600),
        ("16GB", "minimal", "q16", 5, None),
    ],
)
def test_profile_simulated_ram_to_stdout(orion, orion_home, ram, tier, quant, models, keep_alive):
    proc = orion("profile", "--ram", ram, "--output", "-")
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)  # stdout is the YAML and nothing else
    assert (doc["tier"], doc["quantization"], doc["max_models"], doc["keep_alive_s"]) == (tier, quant, models, keep_alive)
    assert doc["device"]["simulated"] is True
    assert doc["memory_budget_bytes"] == int(doc["device"]["memory_limit_bytes"] * 0.75)
    assert not (orion_home / "strategy.yaml").exists()  # '-' writes no file


def test_profile_writes_the_strategy_file_and_summary(orion, orion_home):
    proc = orion("profile")
    assert proc.returncode == 0, proc.stderr
    path = orion_home / "strategy.yaml"
    assert f"Wrote {path}" in proc.stdout
    for label in ("CPU", "Memory", "GPU", "Disk", "Tier", "Budget", "Pressure"):
        assert label in proc.stdout
    doc = yaml.safe_load(path.read_text())
    assert doc["schema_version"] == 1
    assert doc["device"]["simulated"] is False
    assert "high-pressure line" in doc["budget"]


def test_profile_json_and_output_path(orion, tmp_path):
    out = tmp_path / "custom" / "s.yaml"
    proc = orion("profile", "--ram", "3GB", "--vram", "8GB", "--tier", "light", "--json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["path"] == str(out) and out.exists()
    s = data["strategy"]
    assert s["tier"] == "light" and "forced" in s["tier_reason"]
    assert s["n_gpu_layers"] == "auto" and s["gpu_budget_bytes"] == int(8 * GiB * 0.75)
    assert data["pressure"] == "normal"


def test_strategy_command_shows_precedence(orion):
    assert orion("profile", "--ram", "3GB").returncode == 0
    proc = orion("strategy", "--max-models", "4", "--json", env={"ORION_CTX": "1024"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["settings"]["max_models"] == 4 and data["sources"]["max_models"] == "flag"
    assert data["settings"]["n_ctx"] == 1024 and data["sources"]["n_ctx"] == "env ORION_CTX"
    assert data["settings"]["tier"] == "balanced" and data["sources"]["tier"] == "file"
    assert data["settings"]["keep_alive_s"] == 300 and data["sources"]["keep_alive_s"] == "file"
    proc = orion("strategy", "--keep-alive", "never", "--json")
    assert json.loads(proc.stdout)["settings"]["keep_alive_s"] is None


# ---------------------------------------------------------------- bad input: one line, no traceback


def test_ram_banana(orion):
    assert_clean_error(orion("profile", "--ram", "banana"), "--ram 'banana' is not a size", code=2)


def test_unknown_tier(orion):
    assert_clean_error(orion("profile", "--tier", "huge"), "unknown tier 'huge'", "balanced", code=2)


def test_broken_strategy_file(orion, orion_home):
    orion_home.mkdir(parents=True, exist_ok=True)
    (orion_home / "strategy.yaml").write_text("schema_version: 1\ntier: [oops\n")
    proc = orion("strategy")
    assert_clean_error(proc, "is not valid YAML", "orion profile", code=3)
    # --debug shows the traceback as well
    debug = orion("--debug", "strategy")
    assert debug.returncode == 3 and "Traceback" in debug.stderr


def test_wrong_type_in_strategy_file(orion, orion_home):
    orion_home.mkdir(parents=True, exist_ok=True)
    (orion_home / "strategy.yaml").write_text("schema_version: 1\nmax_models: lots\n")
    assert_clean_error(orion("strategy"), "max_models must be a whole number ≥ 1, not 'lots'", code=3)


def test_bad_environment_variable(orion):
    assert_clean_error(orion("strategy", env={"ORION_MAX_MODELS": "-3"}), "ORION_MAX_MODELS='-3' is not valid", code=3)


def test_unwritable_output(orion, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(orion("profile", "--output", str(blocker / "s.yaml")), "cannot write the strategy", code=3)


def test_usage_error_exit_code(orion):
    proc = orion("profile", "--no-such-flag")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No such option" in proc.stderr


def test_help_and_version(orion):
    proc = orion("--help")
    assert proc.returncode == 0 and "profile" in proc.stdout
    assert "Examples" in orion("profile", "--help").stdout
    assert orion("--version").stdout.startswith("orion ")


def test_console_script_is_installed():
    # `orion` on PATH next to this interpreter (pip install -e . made it)
    import shutil
    from pathlib import Path

    exe = Path(sys.executable).parent / "orion"
    assert exe.exists() or shutil.which("orion")
    proc = subprocess.run([str(exe) if exe.exists() else "orion", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("orion ")


def test_startup_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from orion_cli.cli import main\n"
        "try:\n    main(['profile', '--ram', '3GB', '--output', '-'])\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('llama_cpp', 'huggingface_hub', 'numpy', 'gguf', 'torch', 'starlette', 'uvicorn') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
