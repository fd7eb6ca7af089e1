"""orion on an NVIDIA GPU: VRAM estimate against NVML, tokens/s by placement, embeddings against
sentence-transformers. Needs llama-cpp-python built with CUDA (`make gpu`) and a GPU.

    python bench/gpu.py --minilm FOLDER [--out DIR] [--chunks 4000] [--stages vram,speed,embed]

- vram: a random-weight llama of a 1B model's shape (n_embd 2048, n_ff 8192, 16 layers, 32 heads,
  8 KV heads, 128,256 tokens; written with gguf, quantized to Q4_K_M by llama.cpp), loaded fully
  offloaded at n_ctx 2048, 8192 and 32768, each in a fresh process; the context filled with
  tokens; orion's VRAM estimate (orion_cli.offload.plan_offload) against the GPU memory that
  NVML counts in use, less what was in use before the process started.
- speed: generation tokens/s of the same model on the CPU (n_gpu_layers 0), fully offloaded and
  partly offloaded (a GPU budget of half the full-offload estimate: orion chooses the layers).
- embed: FOLDER is all-MiniLM-L6-v2 (sentence-transformers layout; float16 weights are widened to
  float32 first); chunks of 700 characters of Python source; sentence-transformers on CUDA, fp32,
  batch 512, then orion's Encoder (the GGUF orion converts, fully offloaded) with 1 context and
  with the pool orion sizes for the GPU; chunks/s and the least cosine between the two.

Each measurement runs in its own process; results go to DIR/gpu.json and the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLAMA_1B = dict(n_embd=2048, n_ff=8192, n_layers=16, n_head=32, n_head_kv=8, n_vocab=128256, context_length=131072)
MiB = 1024**2


def nvml_used() -> int | None:
    """GPU 0's memory in use (bytes), through orion's NVML reading; None without it."""
    from orion_cli.measure import nvml_memory

    found = nvml_memory()
    return None if found is None else found.used.get(0)


def child_llm(args) -> None:
    """In a child: load the model as orion would (plan, settings), fill the context, measure."""
    import random

    before = nvml_used()
    from orion_cli import engine
    from orion_cli.device import process_memory_bytes
    from orion_cli.placement import offload_plan
    from orion_cli.strategy import load_strategy

    rss0 = process_memory_bytes()
    check = engine.current_check()
    header = engine.validate(Path(args.model))
    budgets = [int(args.budget)] if args.budget else None
    layers = args.layers if args.layers == "auto" else int(args.layers)
    plan, settings = offload_plan(header, args.ctx, load_strategy(), check, gpu_budgets=budgets, gpu_layers=layers)
    spec = engine.LoadSpec(Path(args.model), args.ctx, args.threads, plan.n_gpu_layers, settings=settings,
                           tensor_split=plan.tensor_split)
    start = time.perf_counter()
    model = engine.load(spec, check=check)
    load_s = time.perf_counter() - start
    llm = model._llm
    rng = random.Random(0)
    n_fill = args.ctx - 160 if args.fill else 512
    tokens = [rng.randrange(300, header.n_vocab) for _ in range(n_fill)]
    start = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    n_gen = 128
    for _ in range(n_gen):
        llm.eval([rng.randrange(300, header.n_vocab)])
    gen_s = time.perf_counter() - start
    after = nvml_used()
    print(json.dumps({
        "ctx": args.ctx, "n_gpu_layers": plan.n_gpu_layers, "n_total": plan.n_total,
        "estimate_gpu_bytes": plan.gpu_bytes, "estimate_gpu": [g.to_dict() for g in plan.gpus],
        "estimate_cpu_bytes": plan.cpu.total_bytes,
        "measured_gpu_bytes": None if before is None or after is None else after - before,
        "rss_growth_bytes": process_memory_bytes("VmHWM") - rss0,
        "load_s": round(load_s, 2), "prompt_tok_s": round(n_fill / prompt_s, 1),
        "gen_tok_s": round(n_gen / gen_s, 1), "threads": args.threads,
    }), flush=True)
    model.close()


def child_embed(args) -> None:
    """In a child: orion's Encoder on the converted MiniLM; ``--contexts``/``--pack`` 0: orion's choice
    (the offload plan, :func:`orion_cli.placement.encoder_contexts`, ``settings_for``)."""
    import dataclasses

    from orion_cli import engine
    from orion_cli.embeddings import Encoder
    from orion_cli.placement import encoder_contexts, offload_plan, pool_extra_bytes
    from orion_cli.strategy import load_strategy

    before = nvml_used()
    check = engine.current_check()
    texts = json.loads(Path(args.chunks_file).read_text())
    header = engine.validate(Path(args.model))
    layers = args.layers if args.layers == "auto" else int(args.layers)
    plan, settings = offload_plan(header, 256, load_strategy(), check, embedding=True, gpu_layers=layers)
    contexts = args.contexts or encoder_contexts(plan, args.threads)
    if args.fa >= 0:
        settings = dataclasses.replace(settings, flash_attn=bool(args.fa))
    if args.pack:
        settings = dataclasses.replace(settings, embed_pack=args.pack)
    spec = engine.LoadSpec(Path(args.model), 256, args.threads, plan.n_gpu_layers, embedding=True,
                           settings=settings, contexts=contexts)
    print("loading", flush=True, file=sys.stderr)
    model = engine.load(spec, check=check)
    print("loaded", flush=True, file=sys.stderr)
    enc = Encoder(model, model_id="minilm", max_tokens=256)
    enc.encode(texts[:256])
    after = nvml_used()
    # what orion's manager counts for it (loading.model_request): the plan plus each further context
    estimate = plan.gpu_bytes + pool_extra_bytes(plan, model.n_contexts)[1] if plan.n_gpu_layers else 0
    print("warm", flush=True, file=sys.stderr)
    import numpy as np

    enc.cache = type(enc.cache)(capacity=1)
    start = time.perf_counter()
    vectors = enc.encode(texts)
    rate = len(texts) / (time.perf_counter() - start)
    np.save(args.vectors, vectors)
    print(json.dumps({"chunks_s": round(rate, 1), "contexts": model.n_contexts, "pack": settings.embed_pack,
                      "fa": int(settings.flash_attn), "layers": plan.n_gpu_layers, "threads": args.threads,
                      "chosen": not args.contexts and not args.pack and args.fa < 0,
                      "estimate_gpu_bytes": estimate,
                      "measured_gpu_bytes": None if before is None or after is None else after - before}), flush=True)
    model.close()


PEER = r"""
import json, sys, time
import numpy as np, torch
from sentence_transformers import SentenceTransformer
folder, chunks_file, out, dtype, batch = sys.argv[1:6]
batch = int(batch)
texts = json.load(open(chunks_file))
model = SentenceTransformer(folder, device="cuda")
if dtype == "fp16":
    model = model.half()
model.encode(texts[:1024], batch_size=batch)
torch.cuda.synchronize()
start = time.perf_counter()
v = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
torch.cuda.synchronize()
rate = len(texts) / (time.perf_counter() - start)
np.save(out, v.astype(np.float32))
print(json.dumps({"chunks_s": round(rate, 1), "dtype": dtype, "batch": batch, "torch": torch.__version__}))
"""


def run_child(argv: list[str], log: Path) -> dict | None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-X", "faulthandler", *argv], capture_output=True, text=True, env=env,
                          timeout=900)
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n{done.stderr[-6000:]}\n{done.stdout[-2000:]}\n")
    if done.returncode != 0:
        print(f"  child failed ({done.returncode}): " + "\n    ".join(done.stderr.strip().splitlines()[-14:]), flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_llm(work: Path, threads: int) -> Path:
    from orion_cli.engine import quantize_command
    from orion_cli.tinymodel import write_tiny_llama

    q = work / "llama-1b-shape-Q4_K_M.gguf"
    if q.exists():
        return q
    f16 = work / "llama-1b-shape-F16.gguf"
    start = time.perf_counter()
    write_tiny_llama(f16, weight_type="F16", **LLAMA_1B)
    subprocess.run(quantize_command(f16, q, "Q4_K_M", threads, False), check=True, capture_output=True)
    f16.unlink()
    print(f"model: {q.name}, {q.stat().st_size / MiB:.0f} MiB, written and quantized in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return q


def make_chunks(path: Path, count: int) -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = []
    for f in sorted(stdlib.glob("*.py")):
        text.append(f.read_text(errors="replace"))
        if sum(map(len, text)) > count * 700:
            break
    joined = "".join(text)
    chunks = [joined[i: i + 700] for i in range(0, count * 700, 700)]
    path.write_text(json.dumps(chunks))
    return chunks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["llm", "embed"])
    p.add_argument("--model")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--layers", default="auto")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--fill", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--contexts", type=int, default=0, help="an encoder's contexts (0: orion's choice)")
    p.add_argument("--pack", type=int, default=0, help="sequences an encoder decodes together (0: orion's choice)")
    p.add_argument("--fa", type=int, default=-1, help="encoder flash attention: 0 off, 1 on, -1 orion's choice")
    p.add_argument("--fas", default="-1", help="flash-attention settings to measure the encoder with")
    p.add_argument("--chunks-file")
    p.add_argument("--vectors")
    p.add_argument("--minilm")
    p.add_argument("--out", default="gpu-bench")
    p.add_argument("--work", help="where models and vectors go (default: OUT/work)")
    p.add_argument("--chunks", type=int, default=4000)
    p.add_argument("--stages", default="vram,speed,embed")
    p.add_argument("--pools", default="0", help="encoder contexts to measure (0: orion's choice)")
    p.add_argument("--types", default="f16", help="the encoder's GGUF types to measure (f16, q8_0)")
    p.add_argument("--packs", default="0", help="sequences a decode to measure (0: orion's choice)")
    p.add_argument("--deadline", type=float, default=0, help="stop starting stages after this many seconds")
    args = p.parse_args()
    if args.child == "llm":
        return child_llm(args)
    if args.child == "embed":
        args.layers = int(args.layers)
        return child_embed(args)

    began = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = out / "children.log"
    results: dict = {}

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(results, indent=1))

    def late() -> bool:
        return bool(args.deadline) and time.perf_counter() - began > args.deadline

    from orion_cli.device import detect_gpus
    from orion_cli.engine import current_check

    check = current_check()
    results["gpus"] = [g.__dict__ for g in detect_gpus()]
    results["engine"] = {"features": list(check.features), "default_ok": check.default_ok}
    print(json.dumps(results, indent=1), flush=True)
    me = [str(Path(__file__).resolve())]
    stages = args.stages.split(",")

    if "vram" in stages or "speed" in stages:
        model = make_llm(work, args.threads)
    if "vram" in stages:
        rows = []
        for ctx in (2048, 8192, 32768):
            r = run_child(me + ["--child", "llm", "--model", str(model), "--ctx", str(ctx), "--layers", "auto",
                                "--fill"], log)
            if r and r["measured_gpu_bytes"]:
                err = (r["estimate_gpu_bytes"] - r["measured_gpu_bytes"]) / r["measured_gpu_bytes"]
                r["error"] = round(err, 4)
                print(f"vram ctx {ctx:6d}: layers {r['n_gpu_layers']}/{r['n_total']}  estimate "
                      f"{r['estimate_gpu_bytes'] / MiB:8.1f} MiB  measured {r['measured_gpu_bytes'] / MiB:8.1f} MiB"
                      f"  {err:+.1%}   ({r['estimate_gpu'][0]})  RAM est {r['estimate_cpu_bytes'] / MiB:.0f} MiB,"
                      f" measured {r['rss_growth_bytes'] / MiB:.0f} MiB", flush=True)
                rows.append(r)
        results["vram"] = rows
        save()
    if "speed" in stages and not late():
        rows = []
        full = run_child(me + ["--child", "llm", "--model", str(model), "--ctx", "4096", "--layers", "auto"], log)
        cpu = run_child(me + ["--child", "llm", "--model", str(model), "--ctx", "4096", "--layers", "0"], log)
        partial = None
        if full:
            # room for the runtime, the compute buffer, the output and about half the repeating layers
            g = full["estimate_gpu"][0]
            budget = full["estimate_gpu_bytes"] - (g["weights_bytes"] + g["kv_bytes"]) // 2
            partial = run_child(me + ["--child", "llm", "--model", str(model), "--ctx", "4096", "--layers", "auto",
                                      "--budget", str(budget)], log)
            if partial:
                partial["budget_bytes"] = budget
        for name, r in (("cpu", cpu), ("full", full), ("partial", partial)):
            if r:
                r["placement"] = name
                rows.append(r)
                print(f"speed {name:8s}: n_gpu_layers {r['n_gpu_layers']:2d}/{r['n_total']}  gen {r['gen_tok_s']:7.1f} tok/s"
                      f"  prompt {r['prompt_tok_s']:8.1f} tok/s  load {r['load_s']} s  VRAM est "
                      f"{r['estimate_gpu_bytes'] / MiB:.0f} MiB, measured "
                      f"{(r['measured_gpu_bytes'] or 0) / MiB:.0f} MiB; RAM est {r['estimate_cpu_bytes'] / MiB:.0f} MiB,"
                      f" measured {r['rss_growth_bytes'] / MiB:.0f} MiB", flush=True)
        results["speed"] = rows
        save()
    if "embed" in stages and args.minilm and not late():
        results["embed"] = embed_stage(args, me, out, work, log, late)
        save()
    print(f"total {time.perf_counter() - began:.0f} s", flush=True)


def embed_stage(args, me, out: Path, work: Path, log: Path, late) -> dict:
    import numpy as np

    from orion_cli.convert import convert_bert

    folder = work / "minilm"
    if not folder.exists():
        import shutil

        from safetensors.numpy import load_file, save_file

        shutil.copytree(args.minilm, folder)
        f16 = folder / "model.f16.safetensors"
        if f16.exists():
            save_file({k: v.astype(np.float32) for k, v in load_file(str(f16)).items()}, str(folder / "model.safetensors"))
            f16.unlink()
    ggufs = {}
    for kind in args.types.split(","):
        ggufs[kind] = work / f"minilm-{kind}.gguf"
        if not ggufs[kind].exists():
            convert_bert(folder, ggufs[kind], kind)
    chunks_file = work / "chunks.json"
    make_chunks(chunks_file, args.chunks)
    res: dict = {"chunks": args.chunks, "chunk_chars": 700, "orion": []}
    peer = subprocess.run([sys.executable, "-c", PEER, str(folder), str(chunks_file), str(work / "st.npy"), "fp32", "512"],
                          capture_output=True, text=True)
    if peer.returncode != 0:
        print("peer failed:", peer.stderr[-2000:], flush=True)
        return res
    res["sentence_transformers"] = json.loads(peer.stdout.strip().splitlines()[-1])
    st = np.load(work / "st.npy")
    print(f"embed sentence-transformers (CUDA fp32, batch 512): {res['sentence_transformers']['chunks_s']} chunks/s",
          flush=True)
    # fp16 (what a GPU user runs: .half()) at its default batch (32) and at 512; the faster is the peer
    for batch in (32, 512):
        peer_fp16 = subprocess.run([sys.executable, "-c", PEER, str(folder), str(chunks_file), str(work / "st16.npy"),
                                    "fp16", str(batch)], capture_output=True, text=True)
        if peer_fp16.returncode != 0:
            print("fp16 peer failed:", peer_fp16.stderr[-2000:], flush=True)
            continue
        r16 = json.loads(peer_fp16.stdout.strip().splitlines()[-1])
        res.setdefault("sentence_transformers_fp16_batches", []).append(r16)
        print(f"embed sentence-transformers (CUDA fp16, batch {batch}): {r16['chunks_s']} chunks/s", flush=True)
        if r16["chunks_s"] > res.get("sentence_transformers_fp16", {}).get("chunks_s", 0):
            res["sentence_transformers_fp16"] = r16
    configs = [(kind, fa, pack, n) for kind in ggufs for fa in args.fas.split(",") for pack in args.packs.split(",")
               for n in args.pools.split(",")]
    for kind, fa, pack, n in configs:
        if late():
            break
        chosen = n == "0" and pack == "0" and fa == "-1"
        vec = work / f"orion-{kind}-{n}-{pack}-{fa}.npy"
        # with the machine's threads (shared out between the contexts), as orion runs
        r = run_child(me + ["--child", "embed", "--model", str(ggufs[kind]), "--layers", "-1", "--contexts", n,
                            "--pack", pack, "--threads", str(args.threads),
                            "--chunks-file", str(chunks_file), "--vectors", str(vec), "--fa", fa], log)
        if not r:
            continue
        v = np.load(vec)
        r["min_cosine"] = round(float(np.min(np.sum(v * st, axis=1))), 6)
        r["ratio"] = round(r["chunks_s"] / res["sentence_transformers"]["chunks_s"], 3)
        if "sentence_transformers_fp16" in res:
            r["ratio_fp16"] = round(r["chunks_s"] / res["sentence_transformers_fp16"]["chunks_s"], 3)
        r["type"] = kind
        res["orion"].append(r)
        print(f"embed orion {kind.upper()}{' (its choice)' if chosen else ''} contexts {r['contexts']:2d} pack {r['pack']} "
              f"fa {r['fa']}: {r['chunks_s']:8.1f} chunks/s ({r['ratio']:.2f}x fp32, {r.get('ratio_fp16', 0):.2f}x fp16)  min cosine {r['min_cosine']}"
              f"  VRAM est {r['estimate_gpu_bytes'] / MiB:.0f} MiB, measured "
              f"{(r['measured_gpu_bytes'] or 0) / MiB:.0f} MiB", flush=True)
        (out / "gpu-embed.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
