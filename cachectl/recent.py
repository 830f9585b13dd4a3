"""A bounded map of recent answers, safe across threads: the least recently used goes first.

What a warm process keeps of files it has met (parsed headers, identifications): a daemon's
files are mostly a few kinds, and a bound keeps a long-running one from growing."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


class Recent(Generic[V]):
    def __init__(self, kept: int):
        self._kept = kept
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self._kept:
                self._items.popitem(last=False)
