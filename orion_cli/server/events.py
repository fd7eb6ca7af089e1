"""The manager's events as the server keeps them: the latest for ``/api/orion/ps``, a count of each kind
for ``/metrics``, a line on the console for each, and a live feed for ``/api/orion/events`` subscribers.

The server's warnings are events too (kind ``warning``, :meth:`EventLog.warning`): an RPC server left
out at load time (:data:`orion_cli.rpc.warn`) is in ``/api/orion/ps`` and ``/api/orion/events``, and on the
console as the CLI says it (``warning: ...``).

Each event has a sequence number (``seq``, from 1): a subscriber that reconnects asks for those after
the last it saw, and gets each once (the dashboard's timeline)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable

from .._text import printable
from ..manager import Event


class EventLog:
    """The manager's events: the latest kept, every one printed, and pushed to live subscribers."""

    def __init__(self, keep: int = 200, on_line: Callable[[str], None] | None = None) -> None:
        self.latest: deque[dict] = deque(maxlen=keep)
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()
        self._on_line = on_line
        self.counts: dict[str, int] = {}
        self._seq = 0

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._seq += 1
            doc = {"seq": self._seq, "kind": event.kind, "model": event.key, "detail": event.detail, "at": time.time()}
            self.latest.append(doc)
            self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
            subscribers = list(self._subscribers)
        if self._on_line:  # a model's name or a message may hold escape sequences: shown, never run
            line = (f"warning: {event.detail}" if event.kind == "warning"
                    else f"{time.strftime('%H:%M:%S')} {event.kind:<9} {event.detail or event.key}")
            self._on_line(printable(line, one_line=True))
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, doc)
            except RuntimeError:  # that loop is closed
                pass

    def warning(self, line: str, key: str = "") -> None:
        """A warning of the server's (not the manager's): kept, counted and pushed as an event."""
        self(Event("warning", key, line, time.time()))

    def subscribe(self, since: int | None = None) -> asyncio.Queue:
        """A queue of the events from now on (called in the event loop that reads it); ``since``: the
        kept events after that sequence number first (0: all those kept), none missed or repeated
        between them and the live ones."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if since is not None:
                for doc in self.latest:
                    if doc["seq"] > since:
                        queue.put_nowait(doc)
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]
