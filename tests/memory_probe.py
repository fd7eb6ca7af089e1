"""Measure what loading a GGUF through orion's engine takes, with its context filled.

Run as a child process (the measurement must not share a heap with pytest or the benchmark):
    python tests/memory_probe.py REQUEST_JSON
REQUEST: {"path", "n_ctx", "type_k", "type_v", "n_gpu_layers", "embedding", "threads"}. The model is
loaded with orion's settings for this machine (the engine check's verdict, orion_cli.engine.settings_for)
and the KV types asked; its context is filled with random tokens (an encoder: full windows, as many as a
decode packs). Prints one JSON line: rss growth after loading and after filling (VmRSS), the peak
(VmHWM), all relative to VmRSS before loading (llama.cpp's library already started), and NVML's used
memory growth on GPU 0.

Offloaded, the fill first runs batches of every size a server meets (1 to 512 tokens; an encoder's
windows of 4 tokens to the whole, 1 to ``embed_pack`` at a time): CUDA loads kernels when a shape
first needs them, and cuBLAS's cost about 40 MiB of host memory each (its first use about 46), so
what a model holds on a GPU host grows with the batch sizes it has seen, by 70 to 145 MiB on the
H200 from one fill of the context to all sizes (docs/benchmarks.md). Measured after every size is
what a long-lived model holds; on a CPU nothing loads lazily and the sizes change nothing.
"""

# The batch sizes of the sweep: every size up to 8 (ggml-cuda's small-batch kernels are instantiated
# for each), then the steps where the H200's cuBLAS changed kernels, up to the micro-batch.
SWEEP_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 500, 512)
SWEEP_WINDOWS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

import json
import random
import sys
from pathlib import Path


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _mapped(path: str) -> tuple[int, int]:
    """(resident bytes of the model file's mappings, of anonymous memory) from /proc/self/smaps."""
    file_rss = anon = 0
    current = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = head[5] if len(head) > 5 else ""
            elif line.startswith("Rss:"):
                kb = int(head[1]) * 1024
                if current == path:
                    file_rss += kb
                elif not current or current.startswith("["):
                    anon += kb
    return file_rss, anon


def nvml_used():
    """GPU 0's memory in use (bytes), through orion's NVML reading; None without a GPU."""
    from orion_cli.measure import nvml_memory

    found = nvml_memory()
    return None if found is None else found.used.get(0)


def sweep(model, settings, header, n_ctx: int, rng) -> None:
    """Batches of every size (see the module's docstring), before the context is filled."""
    if model._encoder is not None:
        for window in [w for w in SWEEP_WINDOWS if w < n_ctx - 2] + [n_ctx - 2]:
            for pack in range(1, settings.embed_pack + 1):
                model.embed_tokens([[rng.randrange(100, header.n_vocab) for _ in range(window)] for _ in range(pack)])
        return
    llm, used = model._llm, 0
    for size in SWEEP_SIZES:
        if used + size > n_ctx - 8:  # a small context: start again from its first cell
            llm.reset()
            used = 0
        llm.eval([rng.randrange(300, header.n_vocab) for _ in range(size)])
        used += size


def main() -> None:
    req = json.loads(sys.argv[1])
    gpu0 = nvml_used()
    from orion_cli import engine
    from orion_cli.engine.settings import kv_settings

    check = engine.current_check()
    embedding = bool(req.get("embedding"))
    offload = bool(req.get("n_gpu_layers"))
    settings = kv_settings(engine.settings_for(check, embedding=embedding, offload=offload),
                           req.get("type_k", "f16"), req.get("type_v", "f16"))
    import llama_cpp.llama_cpp as C  # noqa: F401  (the library's own start-up is not the model's memory)

    C.llama_backend_init()
    before = status("VmRSS")
    spec = engine.LoadSpec(Path(req["path"]), int(req["n_ctx"]), int(req.get("threads", 2)),
                           n_gpu_layers=int(req.get("n_gpu_layers", 0)), embedding=embedding, settings=settings)
    model = engine.load(spec, check=check)
    loaded = status("VmRSS")
    header = model.header
    rng = random.Random(0)
    llm = model._llm
    if offload:
        sweep(model, settings, header, int(req["n_ctx"]), rng)
    if embedding:  # full windows, as many as a decode packs
        n = int(req["n_ctx"]) - 2
        model.embed_tokens([[rng.randrange(100, header.n_vocab) for _ in range(n)]
                            for _ in range(settings.embed_pack)])
    else:
        n = int(req["n_ctx"]) - 8
        tokens = [rng.randrange(300, header.n_vocab) for _ in range(n)]
        llm.reset()
        llm.eval(tokens)
    filled = status("VmRSS")
    mapped = _mapped(req["path"])
    peak = status("VmHWM")
    gpu1 = nvml_used()
    print(json.dumps({"load_bytes": loaded - before, "filled_bytes": filled - before, "peak_bytes": peak - before,
                      "tokens": n, "file_rss_bytes": mapped[0], "anon_rss_bytes": mapped[1], "gpu_bytes": None if gpu0 is None or gpu1 is None else gpu1 - gpu0}), flush=True)


if __name__ == "__main__":
    main()
