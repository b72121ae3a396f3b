"""L1: the in-process LRU with a TTL, bounded both by entry count and by bytes."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(slots=True)
class _Slot(Generic[V]):
    value: V
    size: int
    expires_at: float
    route: str


class L1Cache(Generic[V]):
    def __init__(
        self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._slots: OrderedDict[str, _Slot[V]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, key: str) -> V | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if slot.expires_at <= self._clock():
            self._drop(key, slot)
            self.expirations += 1
            return None
        self._slots.move_to_end(key)
        return slot.value

    def put(self, key: str, value: V, *, size: int, ttl_s: float, route: str) -> bool:
        """Store (replacing any older value); False when it can never fit."""
        if ttl_s <= 0 or size > self.max_bytes or self.max_entries <= 0:
            return False
        old = self._slots.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._slots[key] = _Slot(value, size, self._clock() + ttl_s, route)
        self.bytes += size
        while len(self._slots) > self.max_entries or self.bytes > self.max_bytes:
            _, victim = self._slots.popitem(last=False)
            self.bytes -= victim.size
            self.evictions += 1
        return True

    def purge(self, route: str | None = None) -> int:
        """Drop every entry (of `route`, when given); how many went."""
        if route is None:
            count = len(self._slots)
            self._slots.clear()
            self.bytes = 0
            return count
        doomed = [k for k, s in self._slots.items() if s.route == route]
        for key in doomed:
            self._drop(key, self._slots[key])
        return len(doomed)

    def _drop(self, key: str, slot: _Slot[V]) -> None:
        del self._slots[key]
        self.bytes -= slot.size
