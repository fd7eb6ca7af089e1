"""The memory estimate against measurement, over architectures orion was not fitted to.

For each architecture of tests/arch_models.py (random-weight GGUFs written here with ``gguf``: their
memory behaves like the real models', their text is noise), each context and each KV cache type:
orion's estimate (llama.cpp's dry run for this machine's devices, and the formula alone, which
what-ifs use) against what loading through orion's engine with the context filled really took
(tests/memory_probe.py, one child process a cell): on the CPU, resident growth (VmRSS); on a GPU,
every layer offloaded, NVML's used memory (VRAM) and resident growth (RAM).

    python bench/estimate.py --device cpu                      # this machine's CPU
    python bench/estimate.py --device gpu --contexts 4096,16384,65536
    python bench/estimate.py --shapes small --archs llama,bert  # the make-test sizes
    python bench/estimate.py --device gpu --cells llama:16384:f16,llama:4096:f16:Q8_0,me:512:f16 --model me=M.gguf

Prints the table (estimate, measured, error of each cell) and writes it as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

MiB = 1024**2
ENCODER_CONTEXTS = (128, 256, 512)


def measure(path: Path, n_ctx: int, kv: str, *, gpu_layers: int, embedding: bool, threads: int,
            timeout: float) -> dict:
    req = {"path": str(path), "n_ctx": n_ctx, "type_k": kv, "type_v": kv, "embedding": embedding,
           "n_gpu_layers": gpu_layers, "threads": threads}
    proc = subprocess.run([sys.executable, str(HERE.parent / "tests" / "memory_probe.py"), json.dumps(req)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimates(path: Path, n_ctx: int, kv: str, *, gpu: bool, embedding: bool, threads: int) -> dict:
    """orion's figures for the load the probe makes: (RAM, VRAM) from the dry run and from the formula."""
    from orion_cli import engine
    from orion_cli.engine.settings import kv_settings
    from orion_cli.gguf_header import read_local_header
    from orion_cli.offload import plan_offload
    from orion_cli.placement import exact_plan

    check = engine.current_check()
    header = read_local_header(path)
    settings = engine.settings_for(check, embedding=embedding, offload=gpu)
    if not embedding:
        settings = kv_settings(settings, kv, kv)
    layers = header.n_layers + 1 if gpu else 0
    plan = plan_offload(header, n_ctx, settings, [1 << 50] if gpu else [], layers if gpu else 0, embedding=embedding)
    spec = engine.LoadSpec(path, n_ctx, threads, plan.n_gpu_layers, embedding=embedding, settings=settings,
                           tensor_split=plan.tensor_split)
    exact = exact_plan(plan, spec, header)
    return {"ram": exact.cpu.total_bytes, "vram": exact.gpu_bytes if gpu else None,
            "ram_formula": plan.cpu.total_bytes, "vram_formula": plan.gpu_bytes if gpu else None,
            "source": exact.cpu.source, "n_gpu_layers": plan.n_gpu_layers,
            "parts": exact.cpu.to_dict()["parts"], "gpu_parts": [g.to_dict() for g in exact.gpus]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--shapes", default="bench", help="small, bench, check or widths (comma-separated: their union)")
    ap.add_argument("--archs", default="", help="comma-separated (default: all of the shapes)")
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--kv", default="f16,q8_0")
    ap.add_argument("--weights", default="F16", help="the matrices' type in the GGUFs written: F16, Q8_0, Q4_0")
    ap.add_argument("--cells", default="",
                    help="instead of the product: ARCH:N_CTX:KV[:WEIGHTS],... (ARCH may name a --model)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="a GGUF of your own to measure as architecture NAME (with --cells, or alone)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/orion-bench-estimate"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--deadline", type=float, default=0, help="stop starting cells after this many seconds")
    args = ap.parse_args()

    from arch_models import SHAPES, write_model

    from orion_cli.gguf_header import read_local_header

    start = time.monotonic()
    shapes = {name: (kind, shape) for kind in args.shapes.split(",") for name, shape in SHAPES[kind].items()}
    models = dict(m.split("=", 1) for m in args.model)
    if args.cells:
        cells = [(c.split(":") + ["", "", args.weights])[:4] for c in args.cells.split(",")]
        cells = [(a, int(n), kv or "f16", w or args.weights) for a, n, kv, w in cells]
    else:
        cells = []
        for arch in (args.archs.split(",") if args.archs else [*shapes, *models]):
            encoder = (read_local_header(Path(models[arch])).architecture if arch in models
                       else shapes[arch][1]["arch"]) == "bert"
            for n_ctx in (ENCODER_CONTEXTS if encoder else [int(c) for c in args.contexts.split(",")]):
                for kv in (("f16",) if encoder else args.kv.split(",")):
                    cells.append((arch, n_ctx, kv, args.weights))
    gpu = args.device == "gpu"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'arch':11s} {'n_ctx':>6s} {'kv':5s} {'w':4s} | {'RAM est':>9s} {'measured':>9s} {'error':>7s} {'formula':>7s}"
          + (f" | {'VRAM est':>9s} {'measured':>9s} {'error':>7s} {'formula':>7s}" if gpu else ""), flush=True)
    for arch, n_ctx, kv, weights in cells:
        if arch in models:
            path, weights = Path(models[arch]), "file"
        else:
            kind, shape = shapes[arch][0], dict(shapes[arch][1])
            path = args.work / f"{arch}-{kind}-{weights.lower()}.gguf"
            if not path.exists():
                write_model(path.with_suffix(".tmp"), shape.pop("arch"), weight_type=weights, **shape)
                path.with_suffix(".tmp").replace(path)
        embedding = read_local_header(path).architecture == "bert"
        if args.deadline and time.monotonic() - start > args.deadline:
            print("deadline reached: the remaining cells are not measured", flush=True)
            break
        label = f"{arch:11s} {n_ctx:6d} {kv:5s} {weights:4s}"
        est = estimates(path, n_ctx, kv, gpu=gpu, embedding=embedding, threads=args.threads)
        try:
            got = measure(path, n_ctx, kv, gpu_layers=est["n_gpu_layers"], embedding=embedding,
                          threads=args.threads, timeout=600)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"{label} | failed: {exc}", flush=True)
            continue
        row = {"arch": arch, "n_ctx": n_ctx, "kv": kv, "weights": weights, "device": args.device, **est,
               "ram_measured": got["filled_bytes"], "ram_peak": got["peak_bytes"],
               "vram_measured": got["gpu_bytes"], "file_rss": got.get("file_rss_bytes"),
               "anon_rss": got.get("anon_rss_bytes")}
        row["ram_error"] = (row["ram"] - row["ram_measured"]) / row["ram_measured"]
        row["ram_formula_error"] = (row["ram_formula"] - row["ram_measured"]) / row["ram_measured"]
        line = (f"{label} | {row['ram'] / MiB:9.1f} {row['ram_measured'] / MiB:9.1f} "
                f"{row['ram_error']:+7.1%} {row['ram_formula_error']:+7.1%}")
        if gpu and row["vram_measured"]:
            row["vram_error"] = (row["vram"] - row["vram_measured"]) / row["vram_measured"]
            row["vram_formula_error"] = (row["vram_formula"] - row["vram_measured"]) / row["vram_measured"]
            line += (f" | {row['vram'] / MiB:9.1f} {row['vram_measured'] / MiB:9.1f} {row['vram_error']:+7.1%} "
                     f"{row['vram_formula_error']:+7.1%}")
        print(line, flush=True)
        rows.append(row)
    finish(rows, args)


def finish(rows: list[dict], args) -> None:
    keys = ["ram_error"] + (["vram_error"] if args.device == "gpu" else [])
    for key in keys:
        errors = [abs(r[key]) for r in rows if r.get(key) is not None]
        if errors:
            within = sum(e <= 0.05 for e in errors)
            print(f"{key}: {within} of {len(errors)} cells within ±5 %, worst {max(errors):.1%}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
