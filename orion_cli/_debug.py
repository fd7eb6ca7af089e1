"""Whether ``--debug`` is on: one flag (``ORION_DEBUG=1``, set by the CLI's top level), read here alone."""

from __future__ import annotations

import os


def debug_enabled() -> bool:
    return os.environ.get("ORION_DEBUG") == "1"


def enable_debug() -> None:
    """Turn ``--debug`` on for this process and the children it starts."""
    os.environ["ORION_DEBUG"] = "1"
