"""A small thread-safe LRU mapping with hit/miss counters kept under its lock."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LockedLRU(Generic[K, V]):
    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"hits": 0, "misses": 0}

    def get(self, key: K) -> V | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                self.counters["misses"] += 1
                return None
            self._data.move_to_end(key)
            self.counters["hits"] += 1
            return hit

    def put(self, key: K, value: V, replaces: Callable[[K], bool] | None = None) -> None:
        """Store `value`; entries for which `replaces(old_key)` is true are dropped first (a stale version)."""
        with self._lock:
            if replaces is not None:
                for k in [k for k in self._data if replaces(k)]:
                    del self._data[k]
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
