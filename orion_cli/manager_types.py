"""What the model manager takes and gives: a request to load, its entries, their status and events."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from . import ledger


@dataclass(frozen=True)
class Event:
    kind: str  # loading, loaded, evicted, unloaded, refused, cancelled, failed, gone, warning
    key: str
    detail: str = ""
    at: float = 0.0


@dataclass
class Entry:
    key: str
    name: str
    model: Any
    estimate_bytes: int
    loaded_at: float
    last_used: float
    pinned: bool = False
    users: int = 0
    keep_alive_s: int | None = None  # this model's; the manager's default unless set
    gpu_bytes: int = 0  # its VRAM estimate (layers offloaded to GPUs)
    remote: tuple[tuple[str, int, int], ...] = ()  # (RPC server, bytes there, its budget) of each part sent away
    memory: ledger.ModelMemory = field(default_factory=lambda: ledger.ModelMemory({}))  # by device
    placement: str = ""  # where its layers went (the request's; "" when all of them are on the CPU)

    @property
    def budget_bytes(self) -> int:  # the RAM it is counted for: the measured figure once there is one
        return self.memory.ram_bytes if self.memory.estimate else self.estimate_bytes


@dataclass(frozen=True)
class Request:
    """What to load: a key, a display name, its estimate, and how to load it."""

    key: str
    name: str
    estimate_bytes: int
    load: Callable[[threading.Event], Any]  # given a cancel event, returns the loaded model
    hint: str = ""  # what would fit instead, for a refusal
    gpu_bytes: int = 0  # VRAM estimate, counted against the GPU budget apart from RAM
    placement: str = ""  # where its layers go ("all 19 layers on the GPU ..."), shown on loading
    remote: tuple[tuple[str, int, int], ...] = ()  # (RPC server, bytes, that server's budget) of each part
    # the part of estimate_bytes that only a decode makes resident (compute buffers a full context touches):
    # what a measurement taken right after the load does not see yet
    fill_bytes: int = 0
    ledger_key: str = ""  # the model file (its header) and the settings it loads with: the memory ledger's key
    gpu_parts: tuple[int, ...] = ()  # gpu_bytes by GPU, in device order (empty: all of it on GPU 0)
    base_bytes: int = 0  # its runner process's own memory, in estimate_bytes (not the model's: not in the ledger)
    estimate_source: str = ledger.ESTIMATED  # or ledger.RECORDED: the figures its last load measured
    figures: str = "formula"  # where an estimate's buffers came from: "formula" or "llama.cpp dry run"


@dataclass
class ManagerStatus:
    name: str
    key: str
    estimate_bytes: int
    idle_s: float
    pinned: bool
    in_use: bool
    loaded_for_s: float = 0.0
    users: int = 0
    keep_alive_s: int | None = None
    expires_in_s: float | None = None  # None: never unloaded for inactivity (pinned, in use, or no keep-alive)
    gpu_bytes: int = 0
    remote_bytes: int = 0  # on RPC servers
    memory: ledger.ModelMemory | None = None  # by device (ram, gpu0..., rpc:HOST:PORT): estimate and measure
    budget_bytes: int = 0  # the RAM the manager counts it for: the measured figure once known
    placement: str = ""  # where its layers are ("" when all of them are on the CPU)
