"""Adaptive (AIMD) concurrency limits per deployment.

The limit grows by about one for every `limit` successes and shrinks to 90% of what
was in flight when a 429, a 5xx or a latency over the threshold arrives (so one burst of
errors is one step down, not a collapse to the floor). A request over the limit waits a bounded
time for a slot; the caller then tries another deployment, or answers 429/503 with
Retry-After. Upstream pacing hints (`retry-after`, `x-ratelimit-remaining-requests` at 0)
pause the deployment until the time they name, before it starts answering 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

SLOW_GROWTH = 0.1


@dataclass(frozen=True, slots=True)
class LimiterPolicy:
    adaptive: bool = True
    initial: float = 16.0
    minimum: float = 1.0
    maximum: float = 512.0
    latency_threshold_s: float = 5.0
    decrease_factor: float = 0.9
    decrease_gap_s: float = 0.05


class ConcurrencyLimiter:
    def __init__(self, policy: LimiterPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.limit = policy.initial if policy.adaptive else float("inf")
        self.in_flight = 0
        self.paused_until = 0.0
        self.rejected = 0
        self._clock = clock
        self._last_decrease = -1e9
        # The in-flight level where the upstream last pushed back: growth slows near it.
        self._ceiling: float | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now (batch work yields to them, see live_queue)."""
        return len(self._waiters)

    def start_at(self, level: float) -> None:
        """Begin at `level` at least (within the policy's maximum) instead of ramping up
        from the initial limit: for a caller that knows its own bound (a worker's batch
        lines); the limit still adapts down from there on the upstream's answers."""
        if self.policy.adaptive:
            self.limit = min(max(self.limit, level), self.policy.maximum)

    def _has_room(self) -> bool:
        return self.in_flight < self.limit and self._clock() >= self.paused_until

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
        in_flight = self.in_flight
        self.in_flight = max(0, self.in_flight - 1)
        if not self.policy.adaptive:
            self._wake()
            return
        now = self._clock()
        slow = latency_s > self.policy.latency_threshold_s
        if overloaded or slow:
            # Multiplicative decrease, at most once per gap: a burst of errors from one
            # overload is one step, not a collapse. A 429 or 5xx cuts from what was in
            # flight when the upstream pushed back (where its capacity showed, perhaps
            # far under the limit); a slow answer cuts from the limit.
            if now - self._last_decrease >= self.policy.decrease_gap_s:
                base = min(self.limit, float(in_flight)) if overloaded else self.limit
                self.limit = max(self.policy.minimum, base * self.policy.decrease_factor)
                if overloaded:
                    self._ceiling = float(max(in_flight, 1))
                self._last_decrease = now
        elif ok:
            step = 1.0 / max(self.limit, 1.0)
            if self._ceiling is not None:
                if self.limit >= self._ceiling:
                    self._ceiling = None  # past it without complaint: capacity grew
                elif self.limit >= self._ceiling * self.policy.decrease_factor:
                    step *= SLOW_GROWTH  # near the known edge: creep, do not jump
            self.limit = min(self.policy.maximum, self.limit + step)
        self._wake()

    def pause(self, seconds: float) -> None:
        """Hold new requests for `seconds` (upstream said so); never shortens a pause."""
        self.paused_until = max(self.paused_until, self._clock() + seconds)
        loop = asyncio.get_running_loop()
        loop.call_later(seconds, self._wake)

    def _wake(self) -> None:
        if not self._waiters:
            return
        if self.limit == float("inf"):
            free = len(self._waiters)
        else:
            # _has_room admits while in_flight < limit, so a fractional limit has a slot.
            free = math.ceil(self.limit) - self.in_flight
        for waiter in list(self._waiters)[: max(free, 0)]:
            if not waiter.done():
                waiter.set_result(None)

    def snapshot(self) -> dict[str, float | int | None]:
        return {
            "limit": round(self.limit, 2) if self.policy.adaptive else None,
            "in_flight": self.in_flight,
            "rejected": self.rejected,
            "paused_for_s": round(max(0.0, self.paused_until - self._clock()), 2),
        }
