"""Where orion keeps its files.

``ORION_HOME`` (default: the per-user config folder, e.g. ``~/.config/orion``)
holds the strategy file and orion's own state. Model weights live in the
standard Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), never copied.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping


def _expanded(value: str, var: str) -> Path:
    """A folder an environment variable names, ``~`` expanded; ``~user`` for a user this machine does
    not have is one configuration error naming the variable (``Path.expanduser`` raises RuntimeError)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        from .errors import ConfigError

        shown = value if len(value) <= 80 else value[:80] + "…"
        raise ConfigError(f"{var}={shown!r}: there is no such user's home folder here",
                          hint=f"set {var} to a full path") from None


def orion_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("ORION_HOME"):
        return _expanded(env["ORION_HOME"], "ORION_HOME")
    if sys.platform == "win32":
        base = Path(env.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "orion"


def strategy_path(env: Mapping[str, str] | None = None) -> Path:
    return orion_home(env) / "strategy.yaml"


def hf_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, resolved the way huggingface_hub does (without importing it)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return _expanded(env["HF_HUB_CACHE"], "HF_HUB_CACHE")
    if env.get("HF_HOME"):
        return _expanded(env["HF_HOME"], "HF_HOME") / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = _expanded(xdg, "XDG_CACHE_HOME") if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def existing_parent(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists (for free-disk checks)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
