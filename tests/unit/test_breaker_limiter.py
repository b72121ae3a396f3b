"""Circuit breaker and AIMD limiter state machines, on a fake clock."""

from __future__ import annotations

import random

from app.config import Settings
from app.routing.breaker import FORCED_PROBE_GAP_S, Breaker, BreakerPolicy
from app.routing.config import parse_routes
from app.routing.limiter import ConcurrencyLimiter, LimiterPolicy
from app.routing.router import Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_on_failure_rate_after_minimum_requests() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(min_requests=4, failure_rate=0.5, cooldown_s=10), clock)
    b.success()
    b.failure()
    b.failure()
    assert b.current() == "closed"  # under the minimum
    b.failure()
    assert b.current() == "open"  # 3 of 4 failed
    assert not b.allows()


def test_breaker_half_open_probes_then_closes() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(min_requests=2, cooldown_s=10, probes=2), clock)
    b.failure()
    b.failure()
    clock.now += 10.1
    assert b.current() == "half_open"
    assert b.allows()
    assert b.begin()
    assert b.begin()
    assert not b.allows()  # only two probes at once
    b.success()  # a request from before it opened: no evidence of recovery
    assert b.current() == "half_open"
    b.success(probe=True)
    assert b.current() == "half_open"
    b.success(probe=True)
    assert b.current() == "closed"


def test_repeat_failure_pushes_cooldown_later_never_earlier() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(min_requests=1, cooldown_s=10, max_cooldown_s=100), clock)
    b.failure(retry_after_s=30)
    first = b.open_until
    assert first == clock.now + 30  # Retry-After longer than the cooldown wins
    clock.now += 31
    assert b.current() == "half_open"
    for _ in range(5):
        b.failure()  # stragglers sent before it opened do not extend the cooldown
    assert b.current() == "half_open"
    assert b.begin()
    b.failure(probe=True)
    assert b.open_until >= clock.now + 20  # a failed probe: doubled cooldown
    assert b.open_until > first


def test_only_one_forced_probe_at_a_time() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(min_requests=1, cooldown_s=60), clock)
    b.failure()
    assert b.current() == "open"
    assert b.may_force_probe()
    b.forced()
    assert b.begin()
    assert not b.may_force_probe()
    clock.now += FORCED_PROBE_GAP_S
    assert not b.may_force_probe()  # the gap has passed, but the probe is still out
    clock.now -= FORCED_PROBE_GAP_S
    b.neutral(probe=True)
    assert not b.may_force_probe()  # done at once, but the gap has not passed
    clock.now += FORCED_PROBE_GAP_S
    assert b.may_force_probe()


def test_forced_probes_of_a_dead_upstream_are_spaced() -> None:
    """A serial caller's requests, each failing at once, probe once per gap."""
    clock = Clock()
    b = Breaker(BreakerPolicy(min_requests=1, cooldown_s=60), clock)
    b.failure()
    sent = 0
    for _ in range(100):  # 100 requests over 5 s
        if b.may_force_probe():
            b.forced()
            assert b.begin()
            b.failure(probe=True)
            sent += 1
        clock.now += 0.05
    assert sent == round(5 / FORCED_PROBE_GAP_S)


def test_neutral_outcomes_do_not_count() -> None:
    b = Breaker(BreakerPolicy(min_requests=2), Clock())
    for _ in range(10):
        b.neutral()
    assert b.current() == "closed"
    assert b.snapshot()["window_requests"] == 0


def test_limiter_grows_on_success_and_cuts_to_in_flight_on_overload() -> None:
    clock = Clock()
    lim = ConcurrencyLimiter(LimiterPolicy(initial=4), clock)
    for _ in range(40):
        assert lim.try_acquire()
        lim.release(ok=True)
    assert lim.limit > 6
    grown = lim.limit
    for _ in range(6):
        assert lim.try_acquire()
    lim.release(ok=False, overloaded=True)  # 6 were in flight when it said 429
    assert lim.limit == min(grown, 6) * 0.9
    lim.release(ok=False, overloaded=True)  # same burst: no second step
    assert lim.limit == min(grown, 6) * 0.9


async def test_limiter_wakes_a_waiter_for_a_fractional_slot() -> None:
    import asyncio
    import time

    lim = ConcurrencyLimiter(LimiterPolicy(initial=2.5))
    assert lim.try_acquire()
    assert lim.try_acquire()
    assert lim.try_acquire()  # 2 < 2.5: a third fits
    waiter = asyncio.ensure_future(lim.acquire(2.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    lim.release(ok=True)
    assert await asyncio.wait_for(waiter, 1.0)
    assert time.monotonic() - started < 0.5


def test_limiter_slow_latency_counts_as_overload_and_disabled_never_limits() -> None:
    lim = ConcurrencyLimiter(LimiterPolicy(initial=10, latency_threshold_s=1), Clock())
    lim.try_acquire()
    lim.release(ok=True, latency_s=5)
    assert lim.limit < 10
    off = ConcurrencyLimiter(LimiterPolicy(adaptive=False), Clock())
    assert all(off.try_acquire() for _ in range(10_000))


def _router(strategy: str, **extra: object) -> Router:
    routes = parse_routes(
        {
            "routes": {
                "r": {
                    "strategy": strategy,
                    **extra,
                    "deployments": [
                        {"name": "a", "provider": "mock", "model": "a", "weight": 3, "priority": 1},
                        {"name": "b", "provider": "mock", "model": "b", "weight": 1, "priority": 0},
                    ],
                }
            }
        },
        "test",
    )
    return Router(routes, Settings(_env_file=None), random.Random(7))  # type: ignore[call-arg]


def test_priority_and_weighted_orders() -> None:
    assert [d.name for d in _router("priority").ordered("r")] == ["b", "a"]
    router = _router("weighted")
    firsts = [router.ordered("r")[0].name for _ in range(2000)]
    assert 0.68 < firsts.count("a") / 2000 < 0.82  # weight 3 of 4


def test_adaptive_uses_learned_weights_until_then_configured() -> None:
    router = _router("adaptive")
    router.learned_weights["r"] = {"a": 0.0, "b": 1.0}
    assert all(router.ordered("r")[0].name == "b" for _ in range(200))


def test_rate_limit_header_pacing() -> None:
    from datetime import UTC, datetime

    from app.routing.pacing import parse_duration, pause_for

    assert parse_duration("6m0s") == 360
    assert parse_duration("20ms") == 0.02
    assert parse_duration("1h2m3.5s") == 3723.5
    assert pause_for({"x-ratelimit-remaining-requests": "5"}) is None
    assert (
        pause_for({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
        == 1.5
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    hint = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:03Z",
    }
    assert pause_for(hint, now) == 3.0


def test_least_latency_recovers_from_one_slow_first_sample() -> None:
    router = _router("least_latency")
    a, b = router.deployments["r"]
    a.stats.observe(0.05)  # a cold first call
    for _ in range(5):
        b.stats.observe(0.04)
    firsts = [router.ordered("r")[0].name for _ in range(200)]
    assert firsts.count("b") > 150  # b is faster on the evidence so far
    a.stats.observe(0.002)  # measured again (exploration): now clearly faster
    a.stats.observe(0.002)
    firsts = [router.ordered("r")[0].name for _ in range(200)]
    assert firsts.count("a") > 150


def test_a_limiter_can_start_higher_but_never_past_its_maximum() -> None:
    limiter = ConcurrencyLimiter(LimiterPolicy(initial=16, maximum=48))
    limiter.start_at(32)
    assert limiter.limit == 32
    limiter.start_at(8)  # never lowered by a smaller start
    assert limiter.limit == 32
    limiter.start_at(64)
    assert limiter.limit == 48
    fixed = ConcurrencyLimiter(LimiterPolicy(adaptive=False))
    fixed.start_at(8)
    assert fixed.limit == float("inf")
