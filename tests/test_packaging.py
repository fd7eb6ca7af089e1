"""The wheel carries the built-in YAML (profiles/ → orion_cli.profiles), the dashboard's files and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_profiles_and_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("orion_cli-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "orion_cli/profiles/tiers.yaml" in names
        assert "orion_cli/cli/profile.py" in names and "orion_cli/server/app.py" in names
        # the dashboard's files, which orion serve reads from the package (importlib.resources)
        from orion_cli.server.dashboard import FILES

        assert {f"orion_cli/server/static/{name}" for name in FILES} <= names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "orion = orion_cli.cli:main" in zf.read(entry_points).decode()
        metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
    for dep in ("typer", "rich", "huggingface-hub", "llama-cpp-python", "gguf", "psutil", "pyyaml", "numpy",
                "starlette", "uvicorn"):
        assert f"Requires-Dist: {dep}" in metadata
    # the bench peers never become runtime dependencies
    assert "Requires-Dist: sentence-transformers" in metadata
    peers = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: sentence-transformers")]
    assert peers and all("extra ==" in line for line in peers)


def test_profiles_read_through_importlib_resources():
    from importlib.resources import files

    assert "aggressive" in files("orion_cli.profiles").joinpath("tiers.yaml").read_text()
