"""The memory tiers of ``profiles/tiers.yaml`` and the choice of one for a memory limit."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .errors import InvalidValue
from .units import format_bytes

GB = 1024**3


@dataclass(frozen=True)
class Tier:
    name: str
    max_memory_bytes: int | None  # None: no upper bound
    quantization: str
    max_models: int
    keep_alive_s: int | None  # None: never unload for inactivity
    n_ctx: int
    kv_type: tuple[str, str] = ("f16", "f16")  # the KV cache's (K, V) types
    max_kld: float | None = None  # fetch's quality bound (mean KL divergence); None: the level alone


@dataclass(frozen=True)
class TierTable:
    tiers: tuple[Tier, ...]
    pressure_high: float
    pressure_critical: float

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def get(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name.strip().lower():
                return tier
        raise InvalidValue(f"unknown tier {name!r}", hint=f"choose one of {', '.join(self.names)}")

    def for_memory(self, limit_bytes: int) -> tuple[Tier, str]:
        """The tier for a memory limit, and a sentence saying why."""
        lower = 0
        for tier in self.tiers:
            if tier.max_memory_bytes is None or limit_bytes <= tier.max_memory_bytes:
                if tier.max_memory_bytes is None:
                    span = f"over {lower // GB} GB"
                elif lower == 0:
                    span = f"at most {tier.max_memory_bytes // GB} GB"
                else:
                    span = f"over {lower // GB} GB and at most {tier.max_memory_bytes // GB} GB"
                return tier, f"memory limit {format_bytes(limit_bytes)} is {span}"
            lower = tier.max_memory_bytes
        raise AssertionError("tiers.yaml must end with a tier without max_memory_gb")


def parse_tier_table(doc: dict) -> TierTable:
    from .setting_values import parse_kv_type

    tiers = []
    for entry in doc["tiers"]:
        max_gb = entry.get("max_memory_gb")
        tiers.append(
            Tier(
                name=entry["name"],
                max_memory_bytes=None if max_gb is None else int(max_gb * GB),
                quantization=entry["quantization"],
                max_models=int(entry["max_models"]),
                keep_alive_s=entry.get("keep_alive_s"),
                n_ctx=int(entry["n_ctx"]),
                kv_type=parse_kv_type(entry.get("kv_type", "f16")),
                max_kld=None if entry.get("max_kld") is None else float(entry["max_kld"]),
            )
        )
    pressure = doc["pressure"]
    return TierTable(tuple(tiers), float(pressure["high"]), float(pressure["critical"]))


@lru_cache(maxsize=1)
def builtin_tiers() -> TierTable:
    """The tier table shipped inside the package (``orion_cli.profiles/tiers.yaml``)."""
    from importlib.resources import files

    from ._yaml import load_yaml

    text = files("orion_cli.profiles").joinpath("tiers.yaml").read_text(encoding="utf-8")
    return parse_tier_table(load_yaml(text))
