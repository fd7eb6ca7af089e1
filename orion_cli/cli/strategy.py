"""``orion strategy``: the settings in force, and where each one comes from."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import CtxOpt, KvTypeOpt, json_option
from ._output import escape, examples, out

EXAMPLES = examples(
    ("orion strategy", "show every setting and its source"),
    ("ORION_TIER=light orion strategy", "preview another tier's defaults"),
    ("orion strategy --max-models 1 --json", "settings with a flag applied, as JSON"),
)


@json_option("Print the settings and their sources as JSON.")
def strategy(
    tier: Annotated[Optional[str], typer.Option(help="Tier: aggressive, balanced, light or minimal.", metavar="TIER")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Quantization level: q4, q8, q16 or q32.", metavar="LEVEL")] = None,
    max_models: Annotated[Optional[int], typer.Option(help="Most models loaded at once.", metavar="N")] = None,
    keep_alive: Annotated[Optional[str], typer.Option(help="Unload after this much inactivity: 300, 5m, 1h or never.", metavar="TIME")] = None,
    ctx: CtxOpt = None,
    kv_type: KvTypeOpt = None,
) -> None:
    """Show the strategy in force: each setting, its value and where it came from.

    Precedence: command-line flag > ORION_* environment variable > the strategy
    file ($ORION_HOME/strategy.yaml, written by 'orion profile') > the tier's default.
    """
    from ..paths import strategy_path
    from ..strategy import ENV_VARS, SETTING_KEYS, load_strategy

    flags = {"tier": tier, "quantization": quant, "max_models": max_models, "keep_alive_s": keep_alive, "n_ctx": ctx,
             "kv_type": kv_type}
    s = load_strategy(flags)
    path = strategy_path()
    # kv_type as the strategy file writes it (q8_0, or K/V), not the pair
    settings = {key: getattr(s, key) for key in SETTING_KEYS} | {"kv_type": s.to_dict()["kv_type"]}

    def human() -> None:
        from ..units import format_bytes, format_keep_alive

        shown = dict(settings)
        shown["keep_alive_s"] = format_keep_alive(s.keep_alive_s)
        shown["memory_budget_bytes"] = format_bytes(s.memory_budget_bytes)
        shown["gpu_budget_bytes"] = "no GPU" if s.gpu_budget_bytes is None else format_bytes(s.gpu_budget_bytes)
        shown["max_kld"] = "none (the level alone)" if s.max_kld is None else f"{s.max_kld:g}"
        out.table([("setting", {"style": "bold"}), "value", ("from", {"style": "dim"}), ("variable", {"style": "dim"})],
                  [(key, shown[key], s.sources[key], ENV_VARS[key]) for key in SETTING_KEYS])
        where = f"strategy file: {path}" if path.exists() else f"no strategy file yet ({path}): run 'orion profile'"
        out.text(escape(f"\n{where}"))

    out.result({"path": str(path), "file_exists": path.exists(), "settings": settings, "sources": s.sources}, human)
