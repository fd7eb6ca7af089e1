"""`orion eval`: perplexity as llama.cpp's perplexity tool computes it, speed, load time, memory.

Perplexity: the text is tokenized once (with BOS); each window of ``n_ctx``
tokens starts with BOS and is evaluated once; the tokens of its second half are
scored (the negative log-likelihood of each next token); perplexity is
exp(mean NLL) with the standard error of that mean carried through (±).
Each model is evaluated in a child process, so its peak RSS is its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .device import process_memory_bytes
from .errors import InvalidValue

GEN_TOKENS = 32
GEN_PROMPT = "The history of the city of Paris"


@dataclass(frozen=True)
class EvalResult:
    path: str
    file_type: str
    size_bytes: int
    bits_per_weight: float
    n_ctx: int
    chunks: int
    scored_tokens: int
    perplexity: float
    perplexity_err: float
    prompt_tok_s: float
    gen_tok_s: float
    load_s: float
    peak_rss_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare(results: list[EvalResult], n_ctx: int, budget_bytes: int) -> list[dict]:
    """Each result with its perplexity above the best one's, its memory estimate at ``n_ctx`` and
    whether that fits ``budget_bytes``."""
    from .engine import machine_settings
    from .estimate import estimate_memory
    from .gguf_header import read_local_header

    settings = machine_settings()
    best = min(r.perplexity for r in results)
    rows = []
    for r in results:
        est = estimate_memory(read_local_header(Path(r.path)), n_ctx, settings).total_bytes
        rows.append(r.to_dict() | {"delta_perplexity": r.perplexity - best, "estimate_bytes": est,
                                   "fits_budget": est <= budget_bytes})
    return rows


def default_text() -> str:
    from importlib.resources import files

    return files("orion_cli.profiles").joinpath("eval-python-docs.txt").read_text(encoding="utf-8")


def perplexity_from_nll(nll: list[float]) -> tuple[float, float]:
    """exp(mean) and its standard error (delta method), as llama.cpp reports them."""
    n = len(nll)
    mean = sum(nll) / n
    var = sum((x - mean) ** 2 for x in nll) / (n - 1) if n > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(var / n)


def evaluate(path: Path, text: str, n_ctx: int, threads: int) -> EvalResult:
    """Evaluate one model in this process (the child side of :func:`evaluate_in_child`)."""
    from .engine import LoadSpec, Timings, load
    from .gguf_header import read_local_header

    header = read_local_header(path)
    model = load(LoadSpec(Path(path), n_ctx, threads, whole_window=True))
    try:
        tokens = model.tokenize(text)
        n_chunks = len(tokens) // n_ctx
        if n_chunks < 1:
            raise InvalidValue(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}",
                               hint="give a longer --text or a smaller --ctx")
        bos = tokens[0]
        nll: list[float] = []
        start = time.perf_counter()
        for i in range(n_chunks):
            window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            window[0] = bos
            nll += model.perplexity_window(window, n_ctx // 2)
        prompt_s = time.perf_counter() - start
        t = Timings()
        "".join(model.generate(GEN_PROMPT, max_tokens=GEN_TOKENS, temperature=0.0, timings=t))
        ppl, err = perplexity_from_nll(nll)
        return EvalResult(str(path), header.file_type, header.file_size or Path(path).stat().st_size,
                          round(header.bits_per_weight, 2), n_ctx, n_chunks, len(nll), ppl, err,
                          n_chunks * n_ctx / prompt_s, t.gen_tok_s, model.load_s, process_memory_bytes("VmHWM"))
    finally:
        model.close()


def speed(path: Path, threads: int, prompt_tokens: int = 256, n_gpu_layers: int = 0) -> dict:
    """Prompt-processing and generation tokens/s of a model (for `orion profile --bench`);
    ``n_gpu_layers`` -1: every layer on the GPU."""
    from .engine import LoadSpec, Timings, current_check, load, settings_for

    settings = settings_for(current_check(), offload=n_gpu_layers != 0)
    model = load(LoadSpec(Path(path), 1024, threads, n_gpu_layers, settings=settings))
    try:
        text = default_text()
        tokens = model.tokenize(text)[:prompt_tokens]
        start = time.perf_counter()
        model.perplexity_window(tokens, len(tokens) - 2)  # one evaluation of the whole prompt
        prompt_s = time.perf_counter() - start
        t = Timings()
        "".join(model.generate(GEN_PROMPT, max_tokens=GEN_TOKENS, temperature=0.0, timings=t))
        return {"prompt_tok_s": len(tokens) / prompt_s, "gen_tok_s": t.gen_tok_s}
    finally:
        model.close()


def _run_child(args: list[str], what: str, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run ``python -m orion_cli.evaluate ARGS``; its last JSON line, or its error as an OrionError.
    ``progress(done, of)`` for each ``{"progress": …}`` line the child prints as it goes."""
    import tempfile

    from .errors import child_failure, error_from_payload

    from ._proc import die_with_parent

    lines = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orion_cli.evaluate", *args], stdout=subprocess.PIPE,
                                stderr=err, text=True, preexec_fn=die_with_parent)  # a killed eval leaves no child
        for line in proc.stdout:
            if line.startswith('{"progress"'):
                if progress:
                    done = json.loads(line)
                    progress(done["progress"], done["of"])
            elif line.startswith("{"):
                lines.append(line)
        proc.wait()
        err.seek(0)
        stderr = err.read()
    doc = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not lines:
        if doc.get("error"):
            raise error_from_payload(doc)  # the child's own error, its class kept
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
        raise child_failure(proc.returncode, what, last)
    return doc


def evaluate_in_child(path: Path, text_file: Path, n_ctx: int, threads: int) -> EvalResult:
    doc = _run_child([str(path), str(text_file), str(n_ctx), str(threads)], f"evaluating {Path(path).name}")
    return EvalResult(**doc)


def speed_in_child(path: Path, threads: int, n_gpu_layers: int = 0) -> dict:
    return _run_child(["speed", str(path), str(threads), str(n_gpu_layers)], f"measuring {Path(path).name}")


def kld_in_children(reference: Path, targets: list[tuple[Path, str]], text_file: Path, n_ctx: int, threads: int,
                    progress: Callable[[str, int, int], None] | None = None) -> tuple[dict, list]:
    """The reference evaluated once (its log-probabilities kept on disk, :mod:`.kld`), then each
    (model, KV type) of ``targets`` against it, each in a process of its own: two models are never
    loaded at once. ``progress(what, done, of)`` after each window. (reference summary, KLDResults)."""
    import shutil
    import tempfile

    from .kld import KLDResult
    from .paths import orion_home

    def step(what: str):
        return (lambda done, of: progress(what, done, of)) if progress else None

    cache = orion_home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_kld_folders(cache)
    folder = Path(tempfile.mkdtemp(prefix="kld-", dir=cache))  # on disk (a /tmp in memory would hold it in RAM)
    try:
        (folder / "pid").write_text(str(os.getpid()))
        ref = _run_child(["kld-ref", str(reference), str(text_file), str(n_ctx), str(threads), str(folder)],
                         f"evaluating {reference.name}", step(f"reference {reference.name}"))
        results = []
        for path, kv_type in targets:
            doc = _run_child(["kld", str(path), str(folder), str(threads), kv_type], f"evaluating {path.name}",
                             step(f"{path.name} (KV {kv_type})"))
            results.append(KLDResult(**doc))
        return ref | {"path": str(reference)}, results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_kld_folders(cache: Path, *, grace_s: float = 60.0, now: float | None = None) -> list[Path]:
    """The ``kld-*`` folders of ``cache`` that an ``eval --kld`` killed before its cleanup left (its
    process, named in the folder's ``pid``, is gone; a folder without one is older than ``grace_s``),
    removed; a running eval's folder is kept. The ones removed."""
    import shutil
    import time

    from ._proc import alive

    now = time.time() if now is None else now
    removed = []
    for folder in cache.glob("kld-*"):
        try:
            pid = int((folder / "pid").read_text().strip())
        except (OSError, ValueError):
            pid = None
        try:
            young = now - folder.stat().st_mtime < grace_s
        except OSError:
            continue
        if (pid is not None and alive(pid)) or (pid is None and young):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def highest_precision(path: Path) -> Path:
    """The file of the model at ``path`` with the most bits a weight here: among the files registered
    from the same repository, and ``path``'s quantizations cached by ``eval --ladder``; ``path`` itself
    when none has more."""
    from .gguf_header import read_local_header
    from .models import Registry
    from .quantize import quant_cache_path

    path = Path(path)
    found = {path.resolve()}
    models = Registry().all().values()
    for m in models:
        if m.repo and m.path.endswith(".gguf") and Path(m.path).resolve() == path.resolve():
            found |= {Path(o.path).resolve() for o in models
                      if o.repo == m.repo and o.kind == m.kind and o.path.endswith(".gguf") and Path(o.path).exists()}
    cached = quant_cache_path(path, "X")
    found |= set(cached.parent.glob(cached.name[:-len("X.gguf")] + "*.gguf")) if cached.parent.is_dir() else set()
    best, best_bits = path, read_local_header(path).bits_per_weight
    for other in sorted(found - {path.resolve()}):
        bits = read_local_header(other).bits_per_weight
        if bits > best_bits + 0.01:
            best, best_bits = other, bits
    return best


def _child_progress(done: int, of: int) -> None:
    print(json.dumps({"progress": done, "of": of}), flush=True)


def _child_main(argv: list[str]) -> None:
    from .errors import OrionError

    try:
        if argv[0] == "kld-ref":
            from .kld import write_reference

            path, text_file, n_ctx, threads, folder = argv[1:]
            doc = write_reference(Path(path), Path(text_file).read_text(encoding="utf-8"), int(n_ctx), int(threads),
                                  Path(folder), _child_progress)
        elif argv[0] == "kld":
            from .kld import score_against

            path, folder, threads, kv_type = argv[1:]
            doc = score_against(Path(path), Path(folder), int(threads), kv_type, _child_progress).to_dict()
        elif argv[0] == "speed":
            doc = speed(Path(argv[1]), int(argv[2]), n_gpu_layers=int(argv[3]) if len(argv) > 3 else 0)
        else:
            path, text_file, n_ctx, threads = argv
            doc = evaluate(Path(path), Path(text_file).read_text(encoding="utf-8"), int(n_ctx), int(threads)).to_dict()
    except OrionError as exc:
        from .errors import error_payload

        print(json.dumps(error_payload(exc)))
        sys.exit(1)
    except OSError as exc:  # a full disk, a permission: the parent says which
        from .errors import error_payload, from_os_error

        print(json.dumps(error_payload(from_os_error(exc))))
        sys.exit(1)
    print(json.dumps(doc))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
