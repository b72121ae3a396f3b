"""Adaptive (AIMD) concurrency limits per deployment.

The limit grows by about one for every `limit` successes and halves on a 429, a 5xx or
a latency over the threshold (at most once per `decrease_gap_s`, so one burst of errors
is one decrease, not a collapse to the floor). A request over the limit waits a bounded
time for a slot; the caller then tries another deployment, or answers 429/503 with
Retry-After. Upstream pacing hints (`retry-after`, `x-ratelimit-remaining-requests` at 0)
pause the deployment until the time they name, before it starts answering 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimiterPolicy:
    initial: float = 16.0
    minimum: float = 1.0
    maximum: float = 512.0
    latency_threshold_s: float = 5.0
    decrease_factor: float = 0.5
    decrease_gap_s: float = 0.5


class ConcurrencyLimiter:
    def __init__(self, policy: LimiterPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.limit = policy.initial
        self.in_flight = 0
        self.paused_until = 0.0
        self.rejected = 0
        self._clock = clock
        self._last_decrease = -1e9
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _has_room(self) -> bool:
        return self.in_flight < int(self.limit) and self._clock() >= self.paused_until

    def try_acquire(self) -> bool:
        if self._has_room() and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, wait_s: float) -> bool:
        """A slot within `wait_s` seconds, or False (counted as rejected)."""
        if self.try_acquire():
            return True
        deadline = self._clock() + wait_s
        while (remaining := deadline - self._clock()) > 0:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            pause = self.paused_until - self._clock()
            try:
                await asyncio.wait_for(waiter, min(remaining, pause) if pause > 0 else remaining)
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if self._has_room():
                self.in_flight += 1
                return True
        self.rejected += 1
        return False

    def release(self, *, ok: bool, overloaded: bool = False, latency_s: float = 0.0) -> None:
        """Return the slot; `overloaded` is a 429 or 5xx from the upstream."""
        self.in_flight = max(0, self.in_flight - 1)
        now = self._clock()
        if overloaded or latency_s > self.policy.latency_threshold_s:
            if now - self._last_decrease >= self.policy.decrease_gap_s:
                self.limit = max(self.policy.minimum, self.limit * self.policy.decrease_factor)
                self._last_decrease = now
        elif ok:
            self.limit = min(self.policy.maximum, self.limit + 1.0 / max(self.limit, 1.0))
        self._wake()

    def pause(self, seconds: float) -> None:
        """Hold new requests for `seconds` (upstream said so); never shortens a pause."""
        self.paused_until = max(self.paused_until, self._clock() + seconds)
        loop = asyncio.get_running_loop()
        loop.call_later(seconds, self._wake)

    def _wake(self) -> None:
        free = int(self.limit) - self.in_flight
        for waiter in list(self._waiters)[: max(free, 0)]:
            if not waiter.done():
                waiter.set_result(None)

    def snapshot(self) -> dict[str, float | int]:
        return {
            "limit": round(self.limit, 2),
            "in_flight": self.in_flight,
            "rejected": self.rejected,
            "paused_for_s": round(max(0.0, self.paused_until - self._clock()), 2),
        }
