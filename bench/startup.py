"""Start-up time of `orion --help` and `orion profile`, as whole processes.

Prints the median of several runs of each, next to two peers measured in the
same run: the bare interpreter (`python -c pass`, the floor) and Hugging
Face's `hf --help` (another Typer CLI, installed with huggingface_hub).

    python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.3


def timed(cmd: list[str], runs: int, env: dict) -> float:
    subprocess.run(cmd, capture_output=True, env=env, check=True)  # warm the page cache
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    bindir = Path(sys.executable).parent
    orion = str(bindir / "orion") if (bindir / "orion").exists() else shutil.which("orion")
    if not orion:
        sys.exit("orion is not installed next to this interpreter: run 'make install' first")
    hf = str(bindir / "hf") if (bindir / "hf").exists() else shutil.which("hf")

    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, ORION_HOME=home, NO_COLOR="1")
        rows = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"]),
            ("orion --help", [orion, "--help"]),
            ("orion profile", [orion, "profile"]),
            ("orion profile --output -", [orion, "profile", "--output", "-"]),
        ]
        if hf:
            rows.append(("hf --help (peer)", [hf, "--help"]))
        results = {name: timed(cmd, args.runs, env) for name, cmd in rows}

    print(f"median of {args.runs} runs, whole processes ({os.cpu_count()} CPUs)")
    peer = results.get("hf --help (peer)")
    for name, seconds in results.items():
        verdict = ""
        if name.startswith("orion"):
            verdict = "ok" if seconds < TARGET_S else f"over the {TARGET_S} s target"
            if peer:
                verdict += f"; {peer / seconds:.2f}x the speed of hf --help"
        print(f"  {name:28s} {seconds * 1000:7.1f} ms  {verdict}")


if __name__ == "__main__":
    main()
