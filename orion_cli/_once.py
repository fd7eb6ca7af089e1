"""Figures measured once a process (a GPU's free memory before this process loaded anything, an RPC
server's devices), in one visible, thread-safe cache per kind that tests can reset."""

from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class MeasuredOnce(Generic[T]):
    """``get(key, measure)``: ``measure()`` the first time a key is asked, its answer after that."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._values: dict[Hashable, T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, measure: Callable[[], T]) -> T:
        with self._lock:
            if key in self._values:
                return self._values[key]
        value = measure()  # outside the lock: a probe may take seconds
        with self._lock:
            return self._values.setdefault(key, value)

    def known(self, key: Hashable) -> T | None:
        """The value measured for ``key``, or None if it was never asked: never measures."""
        with self._lock:
            return self._values.get(key)

    def forget(self) -> None:
        """Measure again on the next ask (a test's fresh start)."""
        with self._lock:
            self._values.clear()
