"""A model split over llama.cpp's RPC backend against the same model on this machine alone.

Starts two `orion rpc-server`s on 127.0.0.1 and times whole `orion run --json` processes, rounds
alternating, medians reported (load time, prompt and generation tokens/s, from orion's own timings):

- local:              `orion run MODEL` (this machine's engine settings: repacked weights, AMX where on)
- local, split kernels: the engine in a child process with the split's settings (no repacking, since
                        RPC servers run ggml's plain kernels): the baseline that isolates the protocol
- split, N away:      `--rpc A,B --gpu-layers N` (half the layers over loopback)
- split, all away:    `--rpc A,B --gpu-layers -1` (every layer on the servers: the most traffic)

Loopback has no network latency or bandwidth limit: what this measures is the protocol's own cost
(serialising each graph, copying activations between processes, one more hop per device). On 2 cores
the servers and the client share the same cores; they take turns (one device computes at a time).

    python bench/rpc.py [--model PATH] [--rounds 3] [--tokens 128] [--ctx 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = ("Here is a short story about a lighthouse keeper who finds a message in a bottle. It was a cold "
          "morning in late November when the keeper walked down to the rocks below the tower, as he did every "
          "day, to see what the night's storm had left on the shore. Among the seaweed and the broken planks he "
          "saw something glint in the grey light. Once upon a time,")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "rpc-server", "--port", str(port), "--threads",
                             str(threads), "--json"], stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())
    return proc, ready["endpoint"]


SPLIT_KERNELS = r"""
import json, sys
from pathlib import Path
from orion_cli import engine
from orion_cli.engine import LoadSpec, Timings, current_check, settings_for
from orion_cli.placement import rpc_settings
path, ctx, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
check = current_check()
model = engine.load(LoadSpec(Path(path), ctx, threads, settings=rpc_settings(settings_for(check))), check=check)
t = Timings(load_s=model.load_s)
text = "".join(model.generate(prompt, max_tokens=tokens, temperature=0.0, timings=t))
model.close()
print(json.dumps(t.to_dict() | {"text": text}))
"""


def split_kernels(model: Path, tokens: int, ctx: int, threads: int) -> dict:
    """This machine alone with the split's settings (no repacking), through the engine as orion loads."""
    done = subprocess.run([sys.executable, "-c", SPLIT_KERNELS, str(model), str(ctx), str(threads), str(tokens),
                           PROMPT], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"the split-kernels run failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def run(model: Path, args: list[str], tokens: int, ctx: int, threads: int) -> dict:
    env = dict(os.environ, NO_COLOR="1")
    done = subprocess.run([sys.executable, "-m", "orion_cli", "run", str(model), PROMPT, "--json", "--local",
                           "--temperature", "0", "--max-tokens", str(tokens), "--ctx", str(ctx),
                           "--threads", str(threads), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        sys.exit(f"orion run {' '.join(args)} failed: {done.stderr.strip()}")
    doc = json.loads(done.stdout)
    return doc["timings"] | {"text": doc["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).parent.parent / "tests" / ".models"
                        / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    from orion_cli.device import cpu_info
    from orion_cli.gguf_header import read_local_header

    n_layers = read_local_header(args.model).n_layers
    servers = [start_server(args.threads) for _ in range(2)]
    rpc = ",".join(endpoint for _, endpoint in servers)
    configs = {
        "local": [],
        "local, split kernels": None,
        f"split, {(n_layers + 1) // 2} of {n_layers + 1} away": ["--rpc", rpc, "--gpu-layers", str((n_layers + 1) // 2)],
        f"split, all {n_layers + 1} away": ["--rpc", rpc, "--gpu-layers", "-1"],
    }
    results: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in order:
                results[name].append(run(args.model, configs[name], args.tokens, args.ctx, args.threads) if configs[name] is not None
                                     else split_kernels(args.model, args.tokens, args.ctx, args.threads))
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)

    cpu, _, _ = cpu_info()
    print(f"{args.model.name}, n_ctx {args.ctx}, {args.tokens} tokens greedy, {args.threads} threads, "
          f"{args.rounds} rounds (medians); {cpu}, {os.cpu_count()} CPUs; servers on 127.0.0.1")
    med = {name: {k: statistics.median(x[k] for x in rows) for k in ("load_s", "prompt_tok_s", "generation_tok_s")}
           for name, rows in results.items()}
    base = med["local, split kernels"]
    print(f"{'':34s} {'load s':>8s} {'prompt tok/s':>13s} {'gen tok/s':>10s}   vs split kernels (load, prompt, gen)")
    for name, m in med.items():
        print(f"{name:34s} {m['load_s']:8.2f} {m['prompt_tok_s']:13.1f} {m['generation_tok_s']:10.1f}   "
              f"{m['load_s'] / base['load_s']:.2f}x {m['prompt_tok_s'] / base['prompt_tok_s']:.2f}x "
              f"{m['generation_tok_s'] / base['generation_tok_s']:.2f}x")
    same = {name: rows[0]["text"] == results["local, split kernels"][0]["text"] for name, rows in results.items()}
    print("greedy text identical to 'local, split kernels': " + ", ".join(f"{n}: {'yes' if v else 'no'}"
                                                                      for n, v in same.items()))


if __name__ == "__main__":
    main()
