"""``orion profile``: detect the device, pick a tier, write the strategy."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import json_option
from ._output import examples, out


def _bench(threads: int, gpu: bool = False) -> dict:
    """Speed of the default small model, measured in a child process (``gpu``: also with every
    layer on the GPU, for the expected tok/s of offloaded models)."""
    from ..errors import NotFound
    from ..evaluate import speed_in_child
    from ..gguf_header import read_local_header
    from ..models import Registry
    from .._fs import now_iso

    model = Registry().get("gemma3-270m")
    if model is None or not model.exists():
        raise NotFound("--bench measures gemma3-270m, which is not here",
                       hint="orion fetch gemma3-270m (or orion import FILE --name gemma3-270m)")
    with out.status("Measuring gemma3-270m…"):
        result = speed_in_child(Path(model.path), threads)
    header = read_local_header(Path(model.path))
    bench = {"model": model.name, "file_type": header.file_type, "size_bytes": header.file_size,
           "prompt_tok_s": round(result["prompt_tok_s"], 1), "gen_tok_s": round(result["gen_tok_s"], 1),
           "threads": threads, "measured_at": now_iso()}
    if gpu:
        with out.status("Measuring gemma3-270m on the GPU…"):
            on_gpu = speed_in_child(Path(model.path), threads, n_gpu_layers=-1)
        bench["gpu"] = {"prompt_tok_s": round(on_gpu["prompt_tok_s"], 1), "gen_tok_s": round(on_gpu["gen_tok_s"], 1)}
    encoder = _bench_encoder(threads)
    if encoder:
        bench["encoder"] = encoder
    return bench


def _bench_encoder(threads: int) -> dict:
    """chunks/s and quality of the default encoder (minilm) as F16, BF16 and Q8_0, when it is here;
    the type orion converts it to from then on is the fastest that keeps the quality floor."""
    import tempfile

    from ..embeddings import choose_encoder_type, measure_encoder_types
    from ..models import Registry

    local = Registry().get("minilm")
    folder = Path(local.path) if local is not None else None
    if folder is None or not (folder / "model.safetensors").is_file():
        return {}  # never fetched: nothing to measure ('orion embed' fetches it on first use)
    with out.status("Measuring the minilm encoder (F16, BF16 and Q8_0)…"), \
            tempfile.TemporaryDirectory(prefix="orion-bench-") as work:
        measured = measure_encoder_types(folder, Path(work), threads=threads)
    choice = choose_encoder_type(False, measured)
    return {"model": "minilm", "measured": measured, "type": choice.name, "reason": choice.reason}


def _previous_bench(output: str | None) -> dict:
    """Keep the last --bench figures when the strategy is rewritten without --bench."""
    from ..errors import ConfigError
    from ..paths import strategy_path
    from ..strategy import read_strategy_file

    from ..models import on_disk, output_path

    path = output_path(output, "--output") if output else strategy_path()
    try:
        return read_strategy_file(path).get("bench", {}) if on_disk(path) and path.is_file() else {}
    except ConfigError:
        return {}


def _engine_check(force: bool) -> dict:
    """The engine canary's verdict for this llama.cpp build and CPU (cached after the first run)."""
    from ..device import cpu_info
    from ..enginecheck import check_engine, engine_key

    from ..enginebuild import crash_advice, installed_compiler

    model, flags, _ = cpu_info()
    check = check_engine(engine_key(model, flags), force=force)
    compiler = installed_compiler()
    verdict = check.to_dict() | {"features": list(check.features), "amx": check.amx, "compiler": compiler,
                             "gpu_offload": check.gpu_offload, "rpc": check.rpc}
    if not check.default_ok:
        verdict["fix"] = crash_advice(model, flags, compiler)
    return verdict

EXAMPLES = examples(
    ("orion profile", "detect this machine, write the strategy"),
    ("orion profile --ram 3GB -o -", "a 3 GB device's strategy, as YAML"),
    ("orion profile --ram 8GB --vram 8GB", "simulate a laptop with a GPU"),
    ("orion profile --tier light --json", "force a tier; JSON output"),
)


@json_option("Print the strategy as JSON on stdout.")
def profile(
    output: Annotated[
        Optional[str],
        typer.Option("--output", "-o", metavar="PATH", help="Write the strategy here instead of $ORION_HOME/strategy.yaml; '-' prints only the YAML to stdout."),
    ] = None,
    ram: Annotated[
        Optional[str],
        typer.Option(metavar="SIZE", help="Simulate a device with this much RAM and nothing else running (3GB, 512MB; 1 GB = 1024³ bytes)."),
    ] = None,
    vram: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Simulate one GPU with this much VRAM (8GB).")] = None,
    tier: Annotated[
        Optional[str], typer.Option(metavar="TIER", help="Force a tier: aggressive, balanced, light or minimal.")
    ] = None,
    recheck_engine: Annotated[bool, typer.Option("--recheck-engine", help="Run the engine canary again instead of using its cached verdict.")] = False,
    bench: Annotated[bool, typer.Option("--bench", help="Measure prompt and generation tok/s of the default small model (gemma3-270m) and record them.")] = False,
) -> None:
    """Detect RAM, CPU, GPU and disk; pick a memory tier; write the strategy file.

    The tier comes from the memory limit that applies to orion (a container's
    cgroup limit, else physical RAM). The memory budget for models is that
    limit times the high-pressure line (0.75) minus what is in use now.
    """
    from ..device import detect_device, simulate
    from ..paths import strategy_path
    from .._fs import write_text_atomic
    from ..strategy import build_strategy, render_strategy_yaml
    from ..tiers import builtin_tiers
    from ..units import parse_size

    table = builtin_tiers()
    if tier is not None:
        table.get(tier)  # an unknown tier fails before any probing
    if output and output != "-":
        from ..models import output_path

        output_path(output, "--output")  # ~user not here, a name too long: before any probing too
    ram_bytes = parse_size(ram, what="--ram") if ram is not None else None
    vram_bytes = parse_size(vram, what="--vram") if vram is not None else None

    device = detect_device()
    if ram_bytes is not None or vram_bytes is not None:
        device = simulate(device, ram_bytes=ram_bytes, vram_bytes=vram_bytes)
    engine = _engine_check(recheck_engine)
    # a simulated GPU (--vram) shows what a build that offloads would do
    strategy = build_strategy(device, tier, table, gpu_offload=engine["gpu_offload"] or vram_bytes is not None)
    strategy = replace(strategy, engine=engine)
    if bench:
        strategy = replace(strategy, bench=_bench(strategy.threads, gpu=bool(device.gpus) and not device.simulated
                                                  and engine["gpu_offload"]))
    elif output != "-":
        strategy = replace(strategy, bench=_previous_bench(output))
    text = render_strategy_yaml(strategy)

    if output == "-":
        sys.stdout.write(text)
        return
    from ..models import output_path

    # ~user not here, a name too long for a file: one line (the --bench path checked it already)
    path = output_path(output, "--output") if output else strategy_path()
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        from ..errors import ConfigError

        raise ConfigError(
            f"cannot write the strategy to {path}: {exc.strerror or exc}",
            hint="choose another place with --output, or set ORION_HOME",
        ) from exc

    from ..budget import pressure_level

    level = pressure_level(device.memory_in_use_bytes, device.memory_limit_bytes, strategy.pressure_high, strategy.pressure_critical)
    out.result({"path": str(path), "pressure": level, "strategy": strategy.to_dict()},
               lambda: _render_summary(device, strategy, level, path))


def _render_summary(device, strategy, level: str, path: Path) -> None:
    # Plain aligned lines, not rich.table: its import alone costs ~35 ms of
    # the 0.3 s start-up budget.
    from ..units import format_bytes
    from ._output import escape

    def num(value, spec: str) -> str:  # a figure from the strategy file or the engine cache: a number, or "?"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return format(value, spec) if ok else "?"

    rows: list[tuple[str, str]] = []
    sim = " [yellow](simulated)[/]" if device.simulated else ""
    flags = escape(" ".join(device.cpu_flags) or "no SIMD flags found")
    rows.append(("CPU", f"{escape(device.cpu_model)}: {device.physical_cores} cores, {device.logical_cores} threads"
                 f" ({device.usable_cores} usable); {flags}"))
    rows.append(("Memory", f"{format_bytes(device.memory_limit_bytes)} limit ({escape(device.memory_limit_source)}){sim}; "
                 f"{format_bytes(device.memory_in_use_bytes)} in use; RAM {format_bytes(device.ram_total_bytes)}"))
    if device.gpus:
        for g in device.gpus:
            facts = [f"{format_bytes(g.total_bytes)} VRAM, {format_bytes(g.free_bytes)} free"]
            if g.compute_capability:
                facts.append(f"compute capability {escape(g.compute_capability)}")
            if g.driver:
                facts.append(f"driver {escape(g.driver)}" + (f" (CUDA {escape(g.cuda_version)})" if g.cuda_version else ""))
            rows.append(("GPU" if g.index == device.gpus[0].index else "", f"{g.index}: {escape(g.name)}: {', '.join(facts)}"))
    else:
        rows.append(("GPU", "none (models run on the CPU)"))
    rows.append(("Disk", f"{format_bytes(device.disk_free_bytes)} free at {escape(device.disk_path)}"))
    rows.append(("OS", f"{escape(device.os)} ({device.arch})"))
    rows.append(("", ""))
    rows.append(("Tier", f"[bold cyan]{escape(strategy.tier)}[/]: {escape(strategy.tier_reason)}"))
    rows.append(("Defaults", f"quantization {strategy.quantization}, up to {strategy.max_models} model(s) loaded, "
                 f"{_unload(strategy.keep_alive_s)}, context {strategy.n_ctx} tokens, {strategy.threads} threads"))
    rows.append(("KV cache", _kv_cache(strategy)))
    rows.append(("Budget", escape(strategy.budget_arithmetic)))
    if strategy.bench:
        b = strategy.bench
        gpu = b.get("gpu") if isinstance(b.get("gpu"), dict) else {}
        rows.append(("Speed", f"{escape(b.get('model', '?'))} {escape(b.get('file_type', '?'))}: prompt "
                     f"{num(b.get('prompt_tok_s'), '.0f')} tok/s, generation {num(b.get('gen_tok_s'), '.1f')} tok/s "
                     f"({num(b.get('threads'), 'd')} threads)"
                     + (f"; on the GPU {num(gpu.get('prompt_tok_s'), '.0f')} / {num(gpu.get('gen_tok_s'), '.1f')} tok/s"
                        if gpu else "")))
        encoder = b.get("encoder")
        if isinstance(encoder, dict) and encoder:
            rows.append(("Encoder", f"{escape(encoder.get('model', '?'))} as {escape(str(encoder.get('type', '?')).upper())}: "
                         f"{escape(encoder.get('reason', ''))}"))
    if strategy.engine:
        e = strategy.engine
        if e["default_ok"]:
            engine = f"llama.cpp defaults work (canary {num(e.get('tok_s_default'), '.0f')} tok/s)"
        else:
            engine = (f"[yellow]defaults crash ({escape(e.get('default_signal'))})[/]: loading with use_extra_bufts off "
                      f"(canary {num(e.get('tok_s_safe'), '.0f')} tok/s)")
        if e.get("amx"):
            engine += "; AMX kernels on"
        rows.append(("Engine", engine))
        if e.get("fix"):
            rows.append(("Fix", f"[yellow]{escape(e['fix'])}[/]"))
        if e.get("rpc") is False:
            from ..rpc_endpoints import rpc_unsupported

            rows.append(("RPC fix", f"[yellow]{escape(rpc_unsupported().one_line())} (for rpc-server and --rpc)[/]"))
    if strategy.gpu_budget_bytes is not None:
        used = sum(g.used_bytes for g in device.gpus)
        rows.append(("GPU budget", f"{format_bytes(strategy.gpu_budget_bytes)} ({strategy.pressure_high:g} of the VRAM, "
                     f"less {format_bytes(used)} other processes hold); layers on the GPU: {escape(strategy.n_gpu_layers)}"))
    elif device.gpus and strategy.engine and not strategy.engine.get("gpu_offload"):
        rows.append(("GPU fix", "[yellow]this llama.cpp build cannot offload to the GPU: run 'make gpu' (or "
                     "python -m orion_cli.enginebuild install --cuda --rebuild) to build it with CUDA[/]"))
    colour = {"normal": "green", "high": "yellow", "critical": "red"}[level]
    ratio = device.memory_in_use_bytes / device.memory_limit_bytes if device.memory_limit_bytes else 0
    rows.append(("Pressure", f"[{colour}]{level}[/] ({ratio:.0%} of the limit in use; high above "
                 f"{strategy.pressure_high:.0%}, critical above {strategy.pressure_critical:.0%})"))
    for label, value in rows:
        out.text(f"[bold]{label:<11}[/]{value}" if label or value else "")
    out.text(f"\nWrote {escape(str(path))}")


def _kv_cache(strategy) -> str:
    """The KV cache type in force and how to change it, in one line."""
    from ..estimate import KV_TYPES
    from ..setting_values import format_kv_type

    memory = ", ".join(f"{name} {size / block / 2:.0%}" for name, (block, size) in KV_TYPES.items())
    return (f"{format_kv_type(strategy.kv_type)}, the {strategy.tier} tier's default (the cache's memory against f16: "
            f"{memory}); --kv-type or ORION_KV_TYPE set it, for K and V or as K/V (q8_0/q4_0)")


def _unload(keep_alive_s: int | None) -> str:
    from ..units import format_keep_alive

    if keep_alive_s is None:
        return "never unloaded for inactivity"
    return f"unloaded after {format_keep_alive(keep_alive_s)} idle"
