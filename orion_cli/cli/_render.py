"""Rich renderings shared by the model commands: headers, estimates, candidate tables.

Their cells and titles are text (the consoles have markup off, see ``_output``): a GGUF's name or a
Hub file name shows as written; the styled parts are ``Text`` objects.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ..units import format_bytes


def header_table(summary: dict, title: str | None = None) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False, title=title, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    params = summary.get("parameters") or 0
    rows = [
        ("architecture", summary.get("architecture")),
        ("name", summary.get("name")),
        ("file type", summary.get("file_type")),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.0f} M"),
        ("size", f"{format_bytes(summary.get('tensor_bytes'))} of tensors, {summary.get('bits_per_weight')} bits/weight"),
        ("context length", summary.get("context_length")),
        ("layers", summary.get("layers")),
        ("embedding", summary.get("embedding_length")),
        ("heads", f"{summary.get('heads')} ({summary.get('kv_heads')} KV), head dim {summary.get('head_dim')}"),
        ("sliding window", summary.get("sliding_window") or "none"),
        ("vocabulary", summary.get("vocab_size")),
        ("tensors", f"{summary.get('tensors')} in {summary.get('parts')} file(s)"),
    ]
    for k, v in rows:
        if v is not None:
            t.add_row(k, str(v))
    return t


def estimate_table(estimate, budget_bytes: int | None = None) -> Table:
    t = Table(box=None, pad_edge=False, title=f"Memory estimate at n_ctx {estimate.n_ctx}", title_justify="left")
    t.add_column("part", style="bold")
    t.add_column("size", justify="right")
    t.add_column("how", style="dim")
    for name, n, how in estimate.parts():
        t.add_row(name, format_bytes(n), how)
    verdict = Text("")
    if budget_bytes is not None:
        fits = estimate.total_bytes <= budget_bytes
        verdict = Text.assemble(("fits", "green") if fits else ("over", "red"),
                                f" the budget of {format_bytes(budget_bytes)}")
    t.add_row("total", Text(format_bytes(estimate.total_bytes), style="bold"), verdict)
    return t


def candidates_table(plan) -> Table:
    t = Table(box=None, pad_edge=False,
              title=f"{plan.repo} at n_ctx {plan.n_ctx}, budget {format_bytes(plan.budget_bytes)}, "
                    f"{format_bytes(plan.free_disk_bytes)} disk free" + (f", level {plan.level}" if plan.level else ""),
              title_justify="left")
    t.add_column("file")
    t.add_column("type")
    t.add_column("size", justify="right")
    split = any(c.offload is not None and c.offload.devices for c in plan.candidates)
    t.add_column("here" if split else "RAM" if plan.gpu_budgets else "estimate", justify="right")
    if split:
        t.add_column("RPC servers", justify="right")
        t.add_column("layers away", justify="right")
    elif plan.gpu_budgets:
        t.add_column("VRAM", justify="right")
        t.add_column("GPU layers", justify="right")
    if plan.bench and not split:
        t.add_column("~tok/s", justify="right")
    t.add_column("KLD", justify="right")
    t.add_column("verdict")
    from ..fetch import expected_tok_s

    for c in plan.candidates:
        style = "bold green" if c.verdict == "chosen" else ("" if c.fits else "dim")
        name = c.filename + (f" (+{len(c.parts) - 1} parts)" if len(c.parts) > 1 else "")
        cells = [name, c.file_type, format_bytes(c.size_bytes), format_bytes(c.estimate.total_bytes)]
        if split:
            cells += [format_bytes(sum(b for _, b, _ in c.offload.remote_parts)), c.gpu_layers]
        elif plan.gpu_budgets:
            cells += [format_bytes(c.offload.gpu_bytes) if c.offload else "-",
                      c.gpu_layers or f"0/{c.header.n_layers + 1}"]
        if plan.bench and not split:
            speed = expected_tok_s(plan.bench, c.size_bytes, c.gpu_share)
            cells.append(f"{speed:.0f}" if speed else "-")
        cells.append(c.quality.label if c.quality is not None else "?")
        t.add_row(*(str(cell) for cell in cells), c.verdict, style=style)
    return t


def quality_note(plan) -> str:
    """What the KLD column's figures are, and the bound and where it came from."""
    from ..quality import PUBLISHED_SOURCE

    qs = [c.quality for c in plan.candidates if c.quality is not None]
    kinds = []
    if any(q.source == "measured" for q in qs):
        kinds.append("measured here by 'orion eval --kld' (below)")
    if any(q.source == "typical" for q in qs):
        kinds.append("~ " + PUBLISHED_SOURCE.replace("typical for its type: ", "typical for the type, from "))
    if any(q.kld is None for q in qs):
        kinds.append("? unknown (not measured, no published figure for the type)")
    lines = ["KLD: mean KL divergence to the full-precision model (lower is closer): " + "; ".join(kinds)]
    off_kv = next((q for q in qs if not q.kv_measured and q.kld is not None), None)
    if off_kv is not None:
        lines.append(f"~ also marks a figure with an f16 KV cache: a {off_kv.kv_type} cache's own loss is not in it")
    lines += [f"{c.filename}: {c.quality.record.describe()}" for c in plan.candidates
              if c.quality is not None and c.quality.record is not None]
    if plan.max_kld is not None:
        source = {"flag": "--max-kld", "argument": "--max-kld", "file": "the strategy file", "tier": "the tier"}.get(
            plan.max_kld_source, plan.max_kld_source.removeprefix("env ") or "the strategy")
        lines.append(f"bound: max_kld {plan.max_kld:g}, from {source}"
                     + (" (in place of the tier's level)" if plan.level is None and not plan.quant else ""))
    return "\n".join(lines)
