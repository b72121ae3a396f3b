"""Per-deployment circuit breakers.

closed → open when, over a rolling window, enough requests were seen and the share of
upstream-caused failures crosses the threshold. open → half-open once the cooldown has
passed; half-open lets a few probes through, and closes after that many successes in a
row. A failure while open or half-open pushes the cooldown later (doubling, capped),
never earlier. Only failures the upstream caused are counted: callers report the
client's own 4xx and the client's own deadlines as `neutral`.

When every deployment of a route is open, the dispatcher may still send one forced
probe rather than fail at once (a single deployment's blip should not cost the whole
cooldown): none while one is in flight, and at most one chosen per `FORCED_PROBE_GAP_S`,
so a dead upstream whose errors come back at once is not sent every request of a
serial caller. A request whose forced probe fails goes on to its fallbacks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]

FORCED_PROBE_GAP_S = 1.0


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window_s: float = 30.0
    min_requests: int = 5
    failure_rate: float = 0.5
    cooldown_s: float = 10.0
    max_cooldown_s: float = 300.0
    probes: int = 2


@dataclass(slots=True)
class Breaker:
    policy: BreakerPolicy
    clock: Callable[[], float] = time.monotonic
    state: State = "closed"
    open_until: float = 0.0
    cooldown_s: float = 0.0
    opened_count: int = 0
    _outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    _failures: int = 0  # failures among _outcomes, kept as they come and go
    _probes_in_flight: int = 0
    _probe_successes: int = 0
    _next_forced: float = 0.0

    def _refresh(self, now: float) -> None:
        if self.state == "open" and now >= self.open_until:
            self.state = "half_open"
            self._probes_in_flight = 0
            self._probe_successes = 0

    def current(self) -> State:
        self._refresh(self.clock())
        return self.state

    def allows(self) -> bool:
        """May a request go to this deployment now? Half-open admits a few probes."""
        self._refresh(self.clock())
        if self.state == "closed":
            return True
        if self.state == "open":
            return False
        return self._probes_in_flight < self.policy.probes

    def may_force_probe(self) -> bool:
        """Every deployment is open: may one request probe this one anyway? Only one at
        a time and one per FORCED_PROBE_GAP_S, so a dead upstream is not sent every
        request as a "probe"."""
        return self._probes_in_flight == 0 and self.clock() >= self._next_forced

    def forced(self) -> None:
        """A forced probe is going out (then `begin`)."""
        self._next_forced = self.clock() + FORCED_PROBE_GAP_S

    def begin(self) -> bool:
        """A request is going out; True when it is a probe (the breaker is not closed)."""
        if self.current() == "closed":
            return False
        self._probes_in_flight += 1
        return True

    def success(self, probe: bool = False) -> None:
        now = self.clock()
        self._refresh(now)
        if not probe:
            # A request sent while closed: it counts in the window. One that was in
            # flight when the breaker opened says nothing about recovery.
            if self.state == "closed":
                self._remember(now, ok=True)
            return
        self._probes_in_flight = max(0, self._probes_in_flight - 1)
        if self.state == "closed":
            return
        self._probe_successes += 1
        if self._probe_successes >= self.policy.probes:
            self.state = "closed"
            self.cooldown_s = 0.0
            self._outcomes.clear()
            self._failures = 0

    def neutral(self, probe: bool = False) -> None:
        """The request ended in a way that says nothing of the deployment's health."""
        if probe:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def failure(self, retry_after_s: float | None = None, probe: bool = False) -> None:
        now = self.clock()
        self._refresh(now)
        if not probe:
            if self.state == "closed":
                self._remember(now, ok=False)
                if self._should_open(now):
                    self._open(now, self.policy.cooldown_s, retry_after_s)
            # Requests in flight when it opened fail too: that is not a failed probe.
            return
        self._probes_in_flight = max(0, self._probes_in_flight - 1)
        # A failed probe opens it again, for longer.
        longer = min(max(self.cooldown_s, self.policy.cooldown_s) * 2, self.policy.max_cooldown_s)
        self._open(now, longer, retry_after_s)

    def hold_open(self, seconds: float) -> None:
        """Open for `seconds` as its own failures would (probes after), e.g. because
        another gateway's breaker for this deployment is open that much longer."""
        self._open(self.clock(), 0.0, seconds)

    def _open(self, now: float, cooldown_s: float, retry_after_s: float | None) -> None:
        wait = max(cooldown_s, retry_after_s or 0.0)
        self.cooldown_s = cooldown_s
        self.open_until = max(self.open_until, now + wait)  # later, never earlier
        if self.state != "open":
            self.opened_count += 1
        self.state = "open"
        self._probe_successes = 0

    def _remember(self, now: float, *, ok: bool) -> None:
        self._outcomes.append((now, ok))
        self._failures += not ok
        horizon = now - self.policy.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, was_ok = self._outcomes.popleft()
            self._failures -= not was_ok

    def _should_open(self, now: float) -> bool:
        total = len(self._outcomes)
        if total < self.policy.min_requests:
            return False
        return self._failures / total >= self.policy.failure_rate

    def snapshot(self) -> dict[str, object]:
        now = self.clock()
        self._refresh(now)
        failures = self._failures
        return {
            "state": self.state,
            "open_for_s": round(max(0.0, self.open_until - now), 2) if self.state == "open" else 0,
            "cooldown_s": self.cooldown_s,
            "window_requests": len(self._outcomes),
            "window_failures": failures,
            "times_opened": self.opened_count,
        }
