"""``orion eval``: perplexity, speed and memory of a model, or of a ladder of its quantizations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import LocalModelArg, json_option
from ._output import examples, out

EXAMPLES = examples(
    ("orion eval gemma3-270m", "perplexity on the built-in text (Python docs)"),
    ("orion eval model.gguf --text wiki.txt --ctx 1024", "your own text and window"),
    ("orion eval gemma3-270m --ladder Q4_K_M,Q8_0,F16", "quantize to each type (cached) and compare"),
    ("orion eval m.gguf --ladder q4,q8 --markdown q.md --csv q.csv", "export the table"),
)


@json_option("Print the results as JSON.")
def evaluate(
    model: LocalModelArg,
    text: Annotated[Optional[Path], typer.Option(help="The text to score (default: Python's own docs, shipped with orion).", metavar="FILE")] = None,
    ctx: Annotated[int, typer.Option(help="Window size in tokens; the second half of each window is scored.", metavar="N")] = 512,
    ladder: Annotated[Optional[str], typer.Option(help="Comma-separated types or levels to quantize to and compare.", metavar="T1,T2")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table as Markdown here.", metavar="FILE")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the table as CSV here.", metavar="FILE")] = None,
) -> None:
    """Measure a model: perplexity (± standard error), prompt and generation tokens/s, load time, peak RSS.

    Perplexity is computed as llama.cpp's perplexity tool does: windows of --ctx
    tokens, the second half of each scored. With --ladder, the model is quantized
    to each type (kept in $ORION_HOME/cache/quant) and every level is measured the
    same way, each in its own process.
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
