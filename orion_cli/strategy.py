"""The strategy: what every orion command reads to decide quantization, limits and budget.

``orion profile`` builds one from the detected device (:func:`build_strategy`)
and writes it as commented YAML (:func:`render_strategy_yaml`). Every other
command calls :func:`load_strategy`, which resolves each setting with the
precedence *flag > ORION_* environment variable > strategy file > tier default*.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__
from ._fs import now_iso
from ._text import clip
from .budget import Budget, gpu_budgets
from .device import DeviceInfo
from .errors import ConfigError, InvalidValue
from .paths import strategy_path
from .setting_values import _shown, coerce_setting, format_kv_type
from .tiers import Tier, TierTable, builtin_tiers
from .units import format_bytes

SCHEMA_VERSION = 1
# Settings that follow the tier: switching tiers (flag or environment) brings
# the new tier's defaults unless a setting is given at the same or higher level.
TIER_KEYS = ("quantization", "max_kld", "max_models", "keep_alive_s", "n_ctx", "kv_type")
# Settings that follow the device.
DEVICE_KEYS = ("threads", "n_gpu_layers", "memory_budget_bytes", "gpu_budget_bytes", "rpc_servers")
SETTING_KEYS = ("tier",) + TIER_KEYS + DEVICE_KEYS

ENV_VARS = {
    "tier": "ORION_TIER",
    "quantization": "ORION_QUANT",
    "max_kld": "ORION_MAX_KLD",
    "max_models": "ORION_MAX_MODELS",
    "keep_alive_s": "ORION_KEEP_ALIVE",
    "n_ctx": "ORION_CTX",
    "kv_type": "ORION_KV_TYPE",
    "threads": "ORION_THREADS",
    "n_gpu_layers": "ORION_GPU_LAYERS",
    "memory_budget_bytes": "ORION_MEMORY_BUDGET",
    "gpu_budget_bytes": "ORION_GPU_BUDGET",
    "rpc_servers": "ORION_RPC",
}
# The command-line flag of each setting, as error messages name it.
FLAG_NAMES = {"n_ctx": "--ctx", "n_gpu_layers": "--gpu-layers", "keep_alive_s": "--keep-alive",
              "quantization": "--quant", "memory_budget_bytes": "--memory-budget", "gpu_budget_bytes": "--gpu-budget",
              "rpc_servers": "--rpc", "kv_type": "--kv-type", "max_kld": "--max-kld"}
_FILE_ONLY_KEYS = ("schema_version", "orion_version", "created", "tier_reason", "budget", "pressure", "device",
                   "engine", "bench")


@dataclass(frozen=True)
class Strategy:
    tier: str
    quantization: str
    max_models: int
    keep_alive_s: int | None
    n_ctx: int
    kv_type: tuple[str, str]  # the KV cache's (K type, V type), each one of orion_cli.estimate.KV_TYPES
    threads: int
    n_gpu_layers: int | str  # "auto" (fit the GPU budget), -1 (all), 0 (CPU only) or a count
    memory_budget_bytes: int
    gpu_budget_bytes: int | None
    pressure_high: float
    pressure_critical: float
    tier_reason: str = ""
    budget_arithmetic: str = ""
    device: dict = field(default_factory=dict)
    created: str = ""
    # The engine health check's verdict (orion_cli.engine.EngineCheck), when profile ran it.
    engine: dict = field(default_factory=dict)
    # Measured speed of the default small model (orion profile --bench), for expected tok/s.
    bench: dict = field(default_factory=dict)
    # Other machines' RPC servers that take layers ("host:port" or "host:port=BYTES"; orion rpc-server).
    rpc_servers: tuple[str, ...] = ()
    # fetch's quality bound: the most mean KL divergence a chosen file may have (None: the level alone).
    max_kld: float | None = None
    # Where each setting came from: "flag", "env ORION_X", "file", "tier", "device".
    sources: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "orion_version": __version__,
            "created": self.created,
            "tier": self.tier,
            "tier_reason": self.tier_reason,
            "quantization": self.quantization,
            "max_kld": self.max_kld,
            "max_models": self.max_models,
            "keep_alive_s": self.keep_alive_s,
            "n_ctx": self.n_ctx,
            "kv_type": format_kv_type(self.kv_type),
            "threads": self.threads,
            "n_gpu_layers": self.n_gpu_layers,
            "memory_budget_bytes": self.memory_budget_bytes,
            "gpu_budget_bytes": self.gpu_budget_bytes,
            "rpc_servers": list(self.rpc_servers),
            "budget": self.budget_arithmetic,
            "pressure": {"high": self.pressure_high, "critical": self.pressure_critical},
            "device": self.device,
            "engine": self.engine,
            "bench": self.bench,
        }


def _default_threads(device: DeviceInfo) -> int:
    # llama.cpp generates fastest with one thread per physical core it may use.
    return max(1, min(device.physical_cores, device.usable_cores))


def build_strategy(device: DeviceInfo, tier_name: str | None = None, table: TierTable | None = None, *,
                   gpu_offload: bool = True) -> Strategy:
    """The strategy for a device: its tier's defaults and a budget from its memory.

    The tier rule: the tier is the one for the memory models can live in. Without a GPU (or with
    a llama.cpp build that cannot offload, ``gpu_offload`` False) that is the memory limit; with
    GPUs it is the memory limit plus their VRAM, since a model's layers split between the two."""
    table = table or builtin_tiers()
    gpus = device.gpus if gpu_offload else ()
    memory = device.memory_limit_bytes + sum(g.total_bytes for g in gpus)
    if tier_name:
        tier = table.get(tier_name)
        reason = f"forced with --tier (the device's memory limit is {format_bytes(device.memory_limit_bytes)})"
    else:
        tier, reason = table.for_memory(memory)
        if gpus:
            vram = format_bytes(sum(g.total_bytes for g in gpus))
            reason = reason.replace(f"memory limit {format_bytes(memory)}",
                                    f"memory limit {format_bytes(device.memory_limit_bytes)} + {vram} VRAM "
                                    f"= {format_bytes(memory)}")
    budget = Budget.compute(device.memory_limit_bytes, device.memory_in_use_bytes, table.pressure_high)
    gpu_budget = sum(gpu_budgets(gpus, table.pressure_high)) if gpus else None
    return Strategy(
        tier=tier.name,
        quantization=tier.quantization,
        max_kld=tier.max_kld,
        max_models=tier.max_models,
        keep_alive_s=tier.keep_alive_s,
        n_ctx=tier.n_ctx,
        kv_type=tier.kv_type,
        threads=_default_threads(device),
        n_gpu_layers="auto" if gpus else 0,
        memory_budget_bytes=budget.budget_bytes,
        gpu_budget_bytes=gpu_budget,
        pressure_high=table.pressure_high,
        pressure_critical=table.pressure_critical,
        tier_reason=reason,
        budget_arithmetic=budget.arithmetic(),
        device=_device_record(device),
        created=now_iso(),
        sources={k: ("tier" if k in TIER_KEYS else "device") for k in SETTING_KEYS}
        | {"tier": "flag" if tier_name else "device"},
    )


def _device_record(device: DeviceInfo) -> dict:
    d = device.to_dict()
    d["cpu_flags"] = list(d["cpu_flags"])
    d["gpus"] = [dict(g) for g in d["gpus"]]
    return d


# ---------------------------------------------------------------- the file


def read_strategy_file(path: Path, table: TierTable | None = None) -> dict[str, Any]:
    """The settings of a strategy file, validated. Raises ConfigError saying which key is wrong."""
    import yaml

    from ._yaml import load_yaml

    table = table or builtin_tiers()
    hint = f"fix it, or run 'orion profile' to write a new one ({path})"
    if not path.is_file():  # a FIFO would block the read forever
        raise ConfigError(f"the strategy file {path} is not a regular file", hint=hint)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read strategy file {path}: {exc.strerror or exc}", hint=hint) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"strategy file {path} is not UTF-8 text (byte {exc.start})", hint=hint) from exc
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"strategy file {path} is not valid YAML{where}", hint=hint) from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"strategy file {path} must be a YAML mapping of settings", hint=hint)
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"strategy file {path} has schema_version {_shown(version)}, this orion reads {SCHEMA_VERSION}",
            hint="run 'orion profile' to write a new one",
        )
    unknown = sorted(set(doc) - set(SETTING_KEYS) - set(_FILE_ONLY_KEYS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), SETTING_KEYS, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"strategy file {path}: unknown key {unknown[0]!r}", hint=guess + hint)
    settings: dict[str, Any] = {}
    for key in SETTING_KEYS:
        if key not in doc:
            continue
        try:
            settings[key] = coerce_setting(key, doc[key], table=table)
        except ValueError as exc:
            raise ConfigError(
                f"strategy file {path}: {key} must be {exc}, not {_shown(doc[key])}", hint=hint
            ) from None
    pressure = doc.get("pressure", {})
    if pressure:
        if not isinstance(pressure, dict):
            raise ConfigError(f"strategy file {path}: pressure must be a mapping with high and critical", hint=hint)
        for level in ("high", "critical"):
            value = pressure.get(level)
            if level in pressure and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ConfigError(
                    f"strategy file {path}: pressure.{level} must be a fraction between 0 and 1, not {_shown(value)}",
                    hint=hint,
                )
            if level in pressure:
                settings[f"pressure_{level}"] = float(value)
    for key in ("tier_reason", "budget", "created"):
        if isinstance(doc.get(key), str):
            settings[key] = doc[key]
    if isinstance(doc.get("device"), dict):
        settings["device"] = doc["device"]
    if isinstance(doc.get("engine"), dict):
        settings["engine"] = doc["engine"]
    if isinstance(doc.get("bench"), dict):
        settings["bench"] = doc["bench"]
    return settings


_COMMENTS = {
    "tier": "Memory tier: aggressive (≤ 2 GB), balanced (2–4 GB), light (4–8 GB), minimal (> 8 GB).",
    "quantization": "Quantization level for 'fetch --auto': q4 (Q4_K_M), q8 (Q8_0), q16 (F16), q32 (F32).",
    "max_kld": "Quality bound for 'fetch --auto': the most mean KL divergence a file may have (measured by 'orion eval --kld', else typical for its type); set, it replaces the level; null = the level alone.",
    "max_models": "Most models loaded at once; the least recently used idle one is unloaded first.",
    "keep_alive_s": "Unload a model after this many seconds without use; null = never.",
    "n_ctx": "Default context size in tokens (the KV cache grows with it).",
    "kv_type": "KV cache type, for K and V or as K/V (q8_0/q4_0): f16, q8_0 (34/64 of f16's memory), q4_0 (18/64).",
    "threads": "CPU threads for llama.cpp (one per usable physical core).",
    "n_gpu_layers": "Layers offloaded to the GPU: auto = as many as fit the GPU budget, -1 = all, 0 = CPU only.",
    "memory_budget_bytes": "Memory that loaded models may take, in bytes.",
    "gpu_budget_bytes": "GPU memory that offloaded models may take (all GPUs together), in bytes; null = no GPU.",
    "rpc_servers": "Other machines' 'orion rpc-server's that take layers: host:port, or host:port=SIZE to cap it.",
}


def render_strategy_yaml(strategy: Strategy) -> str:
    """The strategy as a commented, human-editable YAML document."""
    import yaml

    def dump(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("\n...").strip()

    data = strategy.to_dict()
    lines = [
        f"# orion strategy, written by 'orion profile' (orion {__version__}) at {strategy.created}.",
        "# Every orion command reads this file; edit it freely, or run 'orion profile' again.",
        "# Precedence: command-line flag > ORION_* environment variable > this file > the tier's default.",
        "# Changing 'tier' here (or with ORION_TIER / --tier) also changes the defaults that follow it",
        f"# ({', '.join(TIER_KEYS)}) unless those are set at the same level or above.",
        f"schema_version: {SCHEMA_VERSION}",
        f"orion_version: {dump(__version__)}",
        f"created: {dump(strategy.created)}",
        "",
        f"# Why this tier: {strategy.tier_reason}" if strategy.tier_reason else None,
    ]
    for key in SETTING_KEYS:
        value = data[key]
        lines.append(f"# {_COMMENTS[key]}  [{ENV_VARS[key]}]")
        if key == "memory_budget_bytes":
            lines.append(f"#   {strategy.budget_arithmetic}")
        elif key in ("gpu_budget_bytes",) and value is not None:
            lines.append(f"#   = {format_bytes(value)}")
        elif key == "keep_alive_s" and value is not None:
            lines.append(f"#   = {value // 60} min" if value >= 60 and value % 60 == 0 else f"#   = {value} s")
        lines.append(f"{key}: {dump(value)}")
    lines += [
        f"tier_reason: {dump(strategy.tier_reason)}",
        f"budget: {dump(strategy.budget_arithmetic)}",
        "",
        "# Memory pressure: used / limit above 'high' is high, above 'critical' is critical.",
        yaml.safe_dump({"pressure": data["pressure"]}, sort_keys=False).strip(),
        "",
        "# The engine check: can llama.cpp's default settings decode a quantized model on this CPU,",
        "# or must orion load with the safe settings (use_extra_bufts off)? tok/s on the canary model.",
        yaml.safe_dump({"engine": data["engine"]}, sort_keys=False, allow_unicode=True).strip(),
        "",
        "# Measured speed of a small model (orion profile --bench); fetch --dry-run scales it by file size.",
        yaml.safe_dump({"bench": data["bench"]}, sort_keys=False, allow_unicode=True).strip(),
        "",
        "# What orion detected when this file was written (for reference; not read back as settings).",
        yaml.safe_dump({"device": data["device"]}, sort_keys=False, allow_unicode=True).strip(),
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


# ---------------------------------------------------------------- loading


def load_strategy(
    flags: Mapping[str, Any] | None = None,
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    device_probe: Callable[[], DeviceInfo] | None = None,
    table: TierTable | None = None,
) -> Strategy:
    """The strategy in force, each setting by precedence: flag > env > file > default.

    ``flags`` holds command-line values (None means "not given"). Without a
    strategy file, defaults come from the detected device, as ``orion profile``
    would write them.
    """
    env = os.environ if env is None else env
    table = table or builtin_tiers()
    path = path or strategy_path(env)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown_flags = set(flags) - set(SETTING_KEYS)
    if unknown_flags:
        raise KeyError(f"not a strategy setting: {sorted(unknown_flags)}")

    file_settings = read_strategy_file(path, table) if path.exists() else None

    def from_flag(key: str) -> Any:
        try:
            return coerce_setting(key, flags[key], table=table)
        except ValueError as exc:
            flag = FLAG_NAMES.get(key, f"--{key.replace('_', '-')}")
            raise InvalidValue(f"{flag} {clip(repr(flags[key]), 60)} is not valid", hint=f"expected {exc}") from None

    def from_env(key: str) -> Any:
        var = ENV_VARS[key]
        try:
            return coerce_setting(key, env[var], table=table)
        except ValueError as exc:
            raise ConfigError(f"{var}={clip(repr(env[var]), 60)} is not valid", hint=f"expected {exc}, or unset it") from None

    base: Strategy | None = None

    def default_strategy() -> Strategy:
        nonlocal base
        if base is None:
            if device_probe is None:
                from .device import detect_device

                device = detect_device()
            else:
                device = device_probe()
            base = build_strategy(device, table=table)
        return base

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def resolve(key: str, file_ok: bool, default: Callable[[], Any]) -> None:
        if key in flags:
            values[key], sources[key] = from_flag(key), "flag"
        elif env.get(ENV_VARS[key], "").strip():
            values[key], sources[key] = from_env(key), f"env {ENV_VARS[key]}"
        elif file_ok and file_settings is not None and key in file_settings:
            values[key], sources[key] = file_settings[key], "file"
        else:
            values[key], sources[key] = default(), None  # type: ignore[assignment]

    resolve("tier", True, lambda: default_strategy().tier)
    if sources["tier"] is None:
        sources["tier"] = "device"
    tier: Tier = table.get(values["tier"])
    file_tier_matches = file_settings is not None and file_settings.get("tier", tier.name) == tier.name
    for key in TIER_KEYS:
        resolve(key, file_tier_matches, lambda key=key: getattr(tier, key))
        sources[key] = sources[key] or "tier"
    for key in DEVICE_KEYS:
        resolve(key, True, lambda key=key: getattr(default_strategy(), key))
        sources[key] = sources[key] or "device"

    if file_settings is not None:
        meta = {
            "tier_reason": file_settings.get("tier_reason", ""),
            "budget_arithmetic": file_settings.get("budget", ""),
            "device": file_settings.get("device", {}),
            "created": file_settings.get("created", ""),
            "engine": file_settings.get("engine", {}),
            "bench": file_settings.get("bench", {}),
            "pressure_high": file_settings.get("pressure_high", table.pressure_high),
            "pressure_critical": file_settings.get("pressure_critical", table.pressure_critical),
        }
    else:
        b = default_strategy()
        meta = {
            "tier_reason": b.tier_reason,
            "budget_arithmetic": b.budget_arithmetic,
            "device": b.device,
            "created": b.created,
            "engine": b.engine,
            "bench": b.bench,
            "pressure_high": b.pressure_high,
            "pressure_critical": b.pressure_critical,
        }
    if sources["tier"] in ("flag",) or sources["tier"].startswith("env"):
        meta["tier_reason"] = f"set by {sources['tier']}"
    return Strategy(**values, **meta, sources=sources)
