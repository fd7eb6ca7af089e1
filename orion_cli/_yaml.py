"""YAML through libyaml's C loader where PyYAML has it (several times faster than pure Python)."""

from __future__ import annotations

from typing import Any


def load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
