"""KL divergence of a model against a reference, with llama.cpp's definitions (``llama-perplexity
--kl-divergence``, tools/perplexity/perplexity.cpp in the vendored llama.cpp).

The text is tokenized once by the reference; windows of ``n_ctx`` tokens (each starting with BOS)
are evaluated once; positions ``n_ctx // 2`` to ``n_ctx - 2`` of each window are scored (the
logits there predict the window's second half). For each scored position:

- the reference's log-probabilities are kept in llama.cpp's uint16 form: the logits clipped to
  [max - 16, max], stored as ``round((logit - min) / scale)`` with ``scale = (max - min) / 65535``
  and the log-probability of the minimum beside it; a token's log-probability is then
  ``scale * q + min_log_prob``;
- KLD = sum over tokens whose reference log-probability is above -16 of
  ``p_ref * (log p_ref - log p_candidate)``: the only tokens llama.cpp's sum counts;
- "same top": the candidate's most likely token is the reference's;
- the negative log-likelihood of the next token under each, for PPL(Q) - PPL(base).

Storage: llama.cpp writes every token's uint16 (512 KiB a position for a 262,144-token vocabulary);
orion keeps only the tokens above -16 (their index and uint16), plus the argmax, the next token's
uint16 and the two floats of each position. That is the same sum exactly, in a twelfth of the room
for gemma3 (about 7,000 of its 262,144 tokens a position), on disk, so the reference and the
candidate are never loaded at once. Means and uncertainties are llama.cpp's
``mean_and_uncertainty``, the percentiles its linear interpolation over the sorted values.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import InvalidValue

FLOOR = -16.0  # llama.cpp: logits below max - 16 are clipped; log-probabilities below -16 are not summed
MIN_POSITIONS = 100  # llama.cpp reports no statistics over fewer scored positions
POSITION = [("scale", "<f4"), ("min_log_prob", "<f4"), ("top", "<i4"), ("q_next", "<u2"),
            ("start", "<i8"), ("count", "<i4")]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class KLDResult:
    path: str
    file_type: str
    kv_type: str
    flash_attn: bool  # llama.cpp quantizes V only with flash attention: on for a quantized KV cache
    size_bytes: int
    bits_per_weight: float
    n_ctx: int
    chunks: int
    scored_tokens: int
    kld_mean: float
    kld_err: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top: float  # a share, 0..1
    same_top_err: float
    perplexity: float
    perplexity_err: float
    perplexity_base: float
    delta_perplexity: float  # PPL(Q) - PPL(base)
    delta_perplexity_err: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def encode(logits, next_token: int):
    """One position's reference in llama.cpp's uint16 form (``log_softmax`` with ``log_prob``):
    (the position's record, the indices of the tokens above -16, their uint16 values)."""
    import numpy as np

    lg = np.asarray(logits, dtype=np.float32)
    max_logit = lg.max()
    min_logit = np.float32(max(lg.min(), max_logit - np.float32(16)))
    log_sum_exp = np.float32(math.log(np.exp(lg - max_logit).sum(dtype=np.float64)))
    min_log_prob = np.float32(min_logit - max_logit - log_sum_exp)
    scale = np.float32((max_logit - min_logit) / np.float32(65535))
    if scale:
        q = np.where(lg > min_logit, np.rint(np.float32(1 / scale) * (lg - min_logit)), 0).astype(np.uint16)
    else:
        q = np.zeros(lg.shape, np.uint16)
    log_p = scale * q.astype(np.float32) + min_log_prob
    kept = np.flatnonzero(log_p > np.float32(FLOOR)).astype(np.int32)
    record = (float(scale), float(min_log_prob), int(np.argmax(log_p)), int(q[next_token]))
    return record, kept, q[kept]


class Accumulator:
    """llama.cpp's ``kl_divergence_result``: sums over the scored positions, and each position's KLD."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(("nll", "nll2", "base", "base2", "nll_base", "kld", "kld2"), 0.0)
        self.same_top = 0
        self.klds: list[float] = []

    def add(self, logits, next_token: int, record, kept, q) -> None:
        import numpy as np

        lg = np.asarray(logits, dtype=np.float32)
        scale, min_log_prob, top_base, q_next = record
        top = int(np.argmax(lg))
        max_logit = lg[top]
        log_sum_exp = np.float32(math.log(np.exp(lg - max_logit).sum(dtype=np.float64)))
        nll = float(max_logit + log_sum_exp - lg[next_token])
        nll_base = -float(np.float32(scale) * np.float32(q_next) + np.float32(min_log_prob))
        log_p_base = np.float32(scale) * q.astype(np.float32) + np.float32(min_log_prob)
        log_p = lg[kept] - (max_logit + log_sum_exp)
        kld = float((np.exp(log_p_base) * (log_p_base - log_p)).sum(dtype=np.float64))
        s = self.sums
        s["nll"] += nll
        s["nll2"] += nll * nll
        s["base"] += nll_base
        s["base2"] += nll_base * nll_base
        s["nll_base"] += nll * nll_base
        s["kld"] += kld
        s["kld2"] += kld * kld
        self.same_top += top == top_base
        self.klds.append(kld)

    def summary(self) -> dict:
        n = len(self.klds)
        enough_positions(n)
        s = self.sums
        log_ppl, log_ppl_err = mean_and_uncertainty(s["nll"], s["nll2"], n)
        log_base, log_base_err = mean_and_uncertainty(s["base"], s["base2"], n)
        cov = (s["nll_base"] / n - (s["nll"] / n) * (s["base"] / n)) / (n - 1)  # n >= 100: llama.cpp's covariance
        ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
        ppl_err, base_err = ppl * log_ppl_err, ppl_base * log_base_err
        diff_var = ppl_err ** 2 + base_err ** 2 - 2 * ppl * ppl_base * cov
        kld, kld_err = mean_and_uncertainty(s["kld"], s["kld2"], n)
        same = self.same_top / n
        values = sorted(self.klds)
        return {"scored_tokens": n, "kld_mean": kld, "kld_err": kld_err, "kld_p99": percentile(values, 0.99),
                "kld_p999": percentile(values, 0.999), "kld_max": values[-1], "same_top": same,
                "same_top_err": math.sqrt(same * (1 - same) / (n - 1)), "perplexity": ppl, "perplexity_err": ppl_err,
                "perplexity_base": ppl_base, "delta_perplexity": ppl - ppl_base,
                "delta_perplexity_err": math.sqrt(max(diff_var, 0.0))}


def enough_positions(n: int) -> None:
    if n < MIN_POSITIONS:
        raise InvalidValue(f"only {n} positions scored, fewer than the {MIN_POSITIONS} llama.cpp asks for "
                           "KL-divergence statistics", hint="give a longer --text: about half its tokens are scored")


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's: the mean and its standard error (0 for ten values or fewer)."""
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def percentile(values: list[float], fraction: float) -> float:
    """llama.cpp's percentile of sorted ``values``: linear between the two nearest."""
    p = fraction * (len(values) - 1)
    i = int(p)
    p -= i
    return (1 - p) * values[i] + p * values[min(i + 1, len(values) - 1)]


def windows(tokens: list[int], n_ctx: int) -> list[list[int]]:
    """The text's whole windows of ``n_ctx`` tokens, each starting with BOS (the text's first token)."""
    n = len(tokens) // n_ctx
    if n < 1:
        raise InvalidValue(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}",
                           hint="give a longer --text or a smaller --ctx")
    out = []
    for i in range(n):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        window[0] = tokens[0]
        out.append(window)
    return out


def _load(path: Path, n_ctx: int, threads: int, kv_type: str):
    """The model as orion loads it for evaluation (``evaluate.evaluate``'s settings), with a KV cache of
    ``kv_type`` for K and V (a quantized one with flash attention, llama.cpp's rule)."""
    from .engine import LoadSpec, load
    from .engine.settings import kv_settings
    from .estimate import EngineSettings

    return load(LoadSpec(Path(path), n_ctx, threads, whole_window=True,
                         settings=kv_settings(EngineSettings(), kv_type, kv_type)))


def write_reference(path: Path, text: str, n_ctx: int, threads: int, folder: Path,
                    progress: Progress | None = None) -> dict:
    """Evaluate the reference over the text's windows and keep its log-probabilities in ``folder``
    (the child side of the reference pass)."""
    import numpy as np

    model = _load(path, n_ctx, threads, "f16")
    start = time.perf_counter()
    try:
        wins = windows(model.tokenize(text), n_ctx)
        enough_positions(len(wins) * (n_ctx - 1 - n_ctx // 2))
        records, offset = [], 0
        with (folder / "index.bin").open("wb") as fi, (folder / "q.bin").open("wb") as fq:
            for w, window in enumerate(wins):
                def keep(j: int, logits) -> None:
                    nonlocal offset
                    record, kept, q = encode(logits, window[j + 1])
                    fi.write(kept.tobytes())
                    fq.write(q.tobytes())
                    records.append(record + (offset, len(kept)))
                    offset += len(kept)

                model.window_logits(window, n_ctx // 2, keep)
                if progress:
                    progress(w + 1, len(wins))
        np.save(folder / "positions.npy", np.array(records, dtype=POSITION))
        meta = {"path": str(path), "n_ctx": n_ctx, "n_vocab": model.n_vocab, "windows": wins,
                "seconds": time.perf_counter() - start}
        (folder / "meta.json").write_text(json.dumps(meta))
        return {"chunks": len(wins), "positions": len(records), "stored_bytes": offset * 6 + len(records) * 24,
                "seconds": meta["seconds"]}
    finally:
        model.close()


def score_against(path: Path, folder: Path, threads: int, kv_type: str = "f16",
                  progress: Progress | None = None) -> KLDResult:
    """Evaluate ``path`` over the reference's windows and compare (the child side of a candidate)."""
    import numpy as np

    from .gguf_header import read_local_header

    meta = json.loads((folder / "meta.json").read_text())
    positions = np.load(folder / "positions.npy")
    index = np.memmap(folder / "index.bin", dtype=np.int32, mode="r") if positions["count"].sum() else None
    qs = np.memmap(folder / "q.bin", dtype=np.uint16, mode="r") if index is not None else None
    n_ctx = meta["n_ctx"]
    header = read_local_header(path)
    model = _load(path, n_ctx, threads, kv_type)
    start = time.perf_counter()
    try:
        if model.n_vocab != meta["n_vocab"]:
            raise InvalidValue(f"{Path(path).name} has {model.n_vocab} tokens, the reference {meta['n_vocab']}",
                               hint="compare files of the same model (one vocabulary)")
        acc = Accumulator()
        k = 0
        for w, window in enumerate(meta["windows"]):
            def compare(j: int, logits) -> None:
                nonlocal k
                p = positions[k]
                lo, n = int(p["start"]), int(p["count"])
                record = (float(p["scale"]), float(p["min_log_prob"]), int(p["top"]), int(p["q_next"]))
                kept = index[lo:lo + n] if n else np.zeros(0, np.int32)
                acc.add(logits, window[j + 1], record, kept, qs[lo:lo + n] if n else np.zeros(0, np.uint16))
                k += 1

            model.window_logits(window, n_ctx // 2, compare)
            if progress:
                progress(w + 1, len(meta["windows"]))
        stats = acc.summary()
        flash = model.spec.settings.flash_attn
        return KLDResult(str(path), header.file_type, kv_type, flash, header.file_size or Path(path).stat().st_size,
                         round(header.bits_per_weight, 2), n_ctx, len(meta["windows"]),
                         seconds=time.perf_counter() - start, **stats)
    finally:
        model.close()
