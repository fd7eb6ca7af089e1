"""``orion eval``: perplexity, speed and memory of a model, or of a ladder of its quantizations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import LocalModelArg, json_option
from ._output import escape, examples, out

EXAMPLES = examples(
    ("orion eval gemma3-270m", "perplexity on the built-in text (Python docs)"),
    ("orion eval model.gguf --text wiki.txt --ctx 1024", "your own text and window"),
    ("orion eval gemma3-270m --ladder Q4_K_M,Q8_0,F16", "quantize to each type (cached) and compare"),
    ("orion eval m.gguf --ladder q4,q8 --markdown q.md --csv q.csv", "export the table"),
    ("orion eval gemma3-270m --kld --against F16 --ladder Q8_0,Q4_K_M,Q2_K", "KL divergence of each quant"),
    ("orion eval gemma3-270m --kld --kv-type f16,q8_0,q4_0", "KL divergence of KV-cache types"),
)


@json_option("Print the results as JSON.")
def evaluate(
    model: LocalModelArg,
    text: Annotated[Optional[Path], typer.Option(help="The text to score (default: Python's own docs, shipped with orion).", metavar="FILE")] = None,
    ctx: Annotated[int, typer.Option(help="Window size in tokens; the second half of each window is scored.", metavar="N")] = 512,
    ladder: Annotated[Optional[str], typer.Option(help="Comma-separated types or levels to quantize to and compare.", metavar="T1,T2")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table as Markdown here.", metavar="FILE")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the table as CSV here.", metavar="FILE")] = None,
    kld: Annotated[bool, typer.Option("--kld", help="Compare with a reference by KL divergence, as llama.cpp's perplexity --kl-divergence does.")] = False,
    against: Annotated[Optional[str], typer.Option(help="With --kld: the reference, a model, a file, or a type to quantize MODEL to (F16). Default: the highest-precision file of this model here.", metavar="REF")] = None,
    kv_type: Annotated[Optional[str], typer.Option(help="With --kld: KV-cache types to measure at the same weights (K and V both): f16, q8_0, q4_0. A quantized cache runs with flash attention (llama.cpp's rule), which itself moves the logits.", metavar="T1,T2")] = None,
) -> None:
    """Measure a model: perplexity (± standard error), prompt and generation tokens/s, load time, peak RSS.

    Perplexity is computed as llama.cpp's perplexity tool does: windows of --ctx
    tokens, the second half of each scored. With --ladder, the model is quantized
    to each type (kept in $ORION_HOME/cache/quant) and every level is measured the
    same way, each in its own process.

    With --kld: the reference and each candidate (each --ladder level, each --kv-type) are run
    over the same windows, one model at a time, and compared as llama.cpp's perplexity
    --kl-divergence does: mean KL divergence (± its standard error), its 99th and 99.9th
    percentiles, the share of positions where the most likely token is the reference's, and
    PPL(Q) - PPL(base). The reference's log-probabilities are kept on disk in llama.cpp's uint16
    form (only the tokens above log p = -16, the ones its sum counts). A reference made from a
    quantized file (--against F16 of a Q4_K_M) measures the loss from that file, not from the
    original model. Each result is recorded in $ORION_HOME/quality.json, where 'orion list',
    'orion inspect' and 'orion fetch --max-kld' read it.
    """
    import tempfile

    from .._text import clip
    from ..errors import InvalidValue, NotFound
    from ..evaluate import compare, default_text, evaluate_in_child
    from ..models import PATH_HINT, local_path, on_disk, output_path, user_path
    from ..quantize import parse_ladder
    from ..strategy import load_strategy

    if ctx < 64:
        raise InvalidValue(f"--ctx {ctx} is too small", hint="use 256 or more")
    for name, value in (("--against", against), ("--kv-type", kv_type)):
        if value is not None and not kld:
            raise InvalidValue(f"{name} compares by KL divergence: it needs --kld", hint=f"orion eval MODEL --kld {name} …")
    kv_types = _kv_types(kv_type) if kv_type is not None else ["f16"]
    strategy = load_strategy()
    path = local_path(model)  # ~user not here, a name too long for a file: NotFound
    if path is None:
        raise NotFound(f"{clip(model, 200)} is not on this machine", hint=f"fetch it first: orion fetch {clip(model, 200)}")
    if text is not None:
        text = user_path(str(text), hint=PATH_HINT)
        if not (on_disk(text) and text.is_file()):  # a name too long for a file names none
            raise NotFound(f"no such text file: {clip(text, 200)}", hint="check --text")
    # where the tables go, checked before the measuring (minutes), not after it
    markdown = output_path(markdown, "--markdown", temporary=False) if markdown is not None else None
    csv_path = output_path(csv_path, "--csv", temporary=False) if csv_path is not None else None
    body = text.read_text(encoding="utf-8", errors="replace") if text else default_text()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(body)
        text_file = Path(f.name)
    if kld:
        try:
            return _kld(path, against, ladder, kv_types, text_file, ctx, strategy.threads, markdown, csv_path, model,
                        text.name if text else "orion's default text (Python's documentation)")
        finally:
            text_file.unlink(missing_ok=True)
    try:
        targets = [(path, None)]
        if ladder:
            targets = [(_ladder_file(path, t, strategy.threads), t) for t in parse_ladder(ladder)]
        results = []
        for target, label in targets:
            with out.status(f"Evaluating {target.name}…"):
                results.append(evaluate_in_child(target, text_file, ctx, strategy.threads))
    finally:
        text_file.unlink(missing_ok=True)
    rows = compare(results, strategy.n_ctx, strategy.memory_budget_bytes)
    if markdown:
        markdown.write_text(_markdown(rows, model, ctx))
    if csv_path:
        _write_csv(csv_path, rows)
    out.result({"model": str(path), "ctx": ctx, "results": rows}, lambda: _render(rows))


def _ladder_file(src: Path, type_name: str, threads: int) -> Path:
    """The model at ``type_name``: the file itself, or a cached quantization (made now if needed)."""
    from ..quantize import ladder_file

    def make(dst: Path) -> None:
        from ..quantize import quantize

        with out.status(f"Quantizing {src.name} to {type_name} (cached for next time)…"):
            quantize(src, dst, type_name, threads=threads, allow_requantize=True)

    return ladder_file(src, type_name, make)


def _kv_types(text: str) -> list[str]:
    from ..errors import InvalidValue
    from ..estimate import KV_TYPES

    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in KV_TYPES]
    if bad or not types:
        raise InvalidValue(f"--kv-type {text!r}: {', '.join(bad) or 'empty'} is not a KV-cache type",
                           hint=f"one or more of {', '.join(KV_TYPES)}, comma-separated")
    return list(dict.fromkeys(types))


def _reference(path: Path, against: str | None, threads: int) -> Path:
    """The --against file (a type name: MODEL quantized to it), else the highest-precision file of the model here."""
    from .._text import clip
    from ..errors import NotFound
    from ..evaluate import highest_precision
    from ..models import local_path
    from ..quant_types import LEVEL_TYPE, QUANTIZABLE

    if against is None:
        return highest_precision(path)
    if against.strip().upper() in QUANTIZABLE or against.strip().lower() in LEVEL_TYPE:
        from ..quantize import resolve_type

        return _ladder_file(path, resolve_type(against), threads)
    ref = local_path(against)
    if ref is None:
        raise NotFound(f"the reference {clip(against, 200)} is not on this machine",
                       hint="fetch it first, or give a file or a type (--against F16)")
    return ref


def _kld(path: Path, against: str | None, ladder: str | None, kv_types: list[str], text_file: Path, ctx: int,
         threads: int, markdown: Path | None, csv_path: Path | None, model: str, text_name: str) -> None:
    import time

    from ..errors import InvalidValue
    from ..evaluate import kld_in_children
    from ..quantize import parse_ladder

    reference = _reference(path, against, threads)
    files = [_ladder_file(path, t, threads) for t in parse_ladder(ladder)] if ladder else [path]
    targets = [(f, kv) for f in files for kv in kv_types]
    if all(f.resolve() == reference.resolve() and kv == "f16" for f, kv in targets):
        raise InvalidValue(f"nothing to compare: {reference.name} is both the reference and the model",
                           hint="give --against (a file, or a type such as F16), --ladder or --kv-type")
    started: dict[str, float] = {}
    with out.status("Evaluating the reference…") as status:
        def progress(what: str, done: int, of: int) -> None:
            t0 = started.setdefault(what, time.monotonic() - 1e-9)
            eta = (time.monotonic() - t0) / done * (of - done)
            status.update(f"{what}: window {done}/{of}, {eta:.0f} s left")

        ref, results = kld_in_children(reference, targets, text_file, ctx, threads, progress)
    from ..errors import OrionError
    from ..quality import QualityBook, record_results

    # each result kept in $ORION_HOME/quality.json: 'orion list', 'inspect' and 'fetch --max-kld' read it
    book = QualityBook()
    try:
        recorded = record_results(results, ref, text_file, text_name, book)
        recorded_note = f"recorded in {book.path}"
    except (OSError, OrionError) as exc:  # the measurement stands: shown, and said not to be kept
        recorded = [None] * len(results)
        why = exc.message if isinstance(exc, OrionError) else (exc.strerror or str(exc))
        recorded_note = ""
        out.warning(f"the results are not recorded in {book.path} ({why}): move it aside and run again to keep them")
    rows = [r.to_dict() | {"recorded_key": q.key if q is not None else None} for r, q in zip(results, recorded)]
    if markdown:
        markdown.write_text(_kld_markdown(rows, model, ref))
    if csv_path:
        _write_csv(csv_path, rows)
    out.result({"model": str(path), "reference": ref, "ctx": ctx, "results": rows},
               lambda: _kld_render(rows, ref, recorded_note))


KLD_HEADERS = ["type", "KV", "flash attn", "size", "mean KLD", "99% KLD", "99.9% KLD", "same top", "Δppl", "perplexity"]


def _kld_cells(row: dict) -> list[str]:
    from ..units import format_bytes

    return [row["file_type"], row["kv_type"], "on" if row["flash_attn"] else "off", format_bytes(row["size_bytes"]),
            f"{row['kld_mean']:.6f} ± {row['kld_err']:.6f}", f"{row['kld_p99']:.5f}", f"{row['kld_p999']:.5f}",
            f"{100 * row['same_top']:.2f} ± {100 * row['same_top_err']:.2f} %",
            f"{row['delta_perplexity']:+.4f} ± {row['delta_perplexity_err']:.4f}", f"{row['perplexity']:.4f}"]


def _kld_caption(rows: list[dict], ref: dict) -> str:
    r = rows[0]
    return (f"against {Path(ref['path']).name} (perplexity {r['perplexity_base']:.4f}): {r['chunks']} windows of "
            f"{r['n_ctx']} tokens, {r['scored_tokens']} positions scored")


def _kld_render(rows: list[dict], ref: dict, recorded_note: str = "") -> None:
    out.table([(h, {"justify": "left" if h in ("type", "KV", "flash attn") else "right"}) for h in KLD_HEADERS],
              [_kld_cells(row) for row in rows])
    out.text(f"[dim]{escape(_kld_caption(rows, ref))}[/]")
    if recorded_note:
        out.text(f"[dim]{escape(recorded_note)}: 'orion list', 'inspect' and 'fetch --max-kld' read it[/]")


def _kld_markdown(rows: list[dict], model: str, ref: dict) -> str:
    lines = [f"`orion eval {model} --kld` — {_kld_caption(rows, ref)}", "",
             "| " + " | ".join(KLD_HEADERS) + " |", "|" + "---|" * len(KLD_HEADERS)]
    lines += ["| " + " | ".join(_kld_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


HEADERS = ["type", "size", "bits/weight", "perplexity", "Δ vs best", "prompt tok/s", "gen tok/s", "peak RSS",
           "fits budget"]


def _cells(row: dict) -> list[str]:
    from ..units import format_bytes

    return [row["file_type"], format_bytes(row["size_bytes"]), f"{row['bits_per_weight']:.2f}",
            f"{row['perplexity']:.4f} ± {row['perplexity_err']:.4f}", f"+{row['delta_perplexity']:.4f}",
            f"{row['prompt_tok_s']:.1f}", f"{row['gen_tok_s']:.1f}", format_bytes(row["peak_rss_bytes"]),
            "yes" if row["fits_budget"] else "no"]


def _render(rows: list[dict]) -> None:
    out.table([(h, {"justify": "left" if h in ("type", "fits budget") else "right"}) for h in HEADERS],
              [_cells(row) for row in rows])
    r = rows[0]
    out.text(f"[dim]{r['chunks']} windows of {r['n_ctx']} tokens, {r['scored_tokens']} tokens scored[/]")


def _markdown(rows: list[dict], model: str, ctx: int) -> str:
    lines = [f"`orion eval {model}` — {rows[0]['chunks']} windows of {ctx} tokens, "
             f"{rows[0]['scored_tokens']} tokens scored", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        keys = list(rows[0])
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] for k in keys])
