"""Attempts, retries, fallbacks and hedges for one request, under one deadline.

For a route: try its deployments in strategy order, skipping open breakers and
deployments inside an upstream's Retry-After; retry only what `failures.classify` says
is retryable, going straight to another deployment when there is one and backing off
(jittered, capped, never before Retry-After) when there is not. When the route is
spent, its fallbacks are tried in turn; a prompt too long for a route only falls back
to a route with a larger context window. Every attempt's timeout is cut to what is left
of the request's deadline. Nothing here knows about HTTP or SSE: `attempt` makes one
upstream call, and for streams it returns once the first chunk is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.errors import (
    GatewayError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.routing.failures import Failure, classify
from app.routing.router import Deployment, Router, Target

T = TypeVar("T")
Attempt = Callable[[Target], Awaitable[T]]
Discard = Callable[[T], Awaitable[None]]
YieldTo = Callable[[str, str], Awaitable[float]]  # (route, deployment) -> seconds waited

BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 2.0


class Lease:
    """One attempt's hold on a deployment; reports how it ended exactly once."""

    __slots__ = ("_clock", "deployment", "ended", "probe", "started")

    def __init__(self, deployment: Deployment, clock: Callable[[], float]) -> None:
        self.deployment = deployment
        self._clock = clock
        self.started = clock()
        self.ended = False
        self.probe = deployment.breaker.begin()

    def succeeded(self, ttfb_s: float | None = None) -> None:
        """`ttfb_s` for streams: how long a stream then runs is the answer's length, not
        the deployment's speed, so the limiter and the statistics see the first byte."""
        if self.ended:
            return
        self.ended = True
        latency = self._clock() - self.started if ttfb_s is None else ttfb_s
        d = self.deployment
        d.breaker.success(self.probe)
        d.limiter.release(ok=True, latency_s=latency)
        d.stats.observe(latency, ttfb_s)

    def failed(self, failure: Failure, retry_after_s: float | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        d = self.deployment
        if failure in (Failure.UPSTREAM, Failure.MISCONFIGURED):
            d.breaker.failure(retry_after_s, self.probe)
        else:
            # The client's error or deadline says nothing of health; a 429 says "slower",
            # which the limiter and Retry-After handle: opening the breaker on it would
            # take a working deployment out of service.
            d.breaker.neutral(self.probe)
        overloaded = failure in (Failure.UPSTREAM, Failure.RATE_LIMITED)
        d.limiter.release(ok=False, overloaded=overloaded)
        if retry_after_s:
            d.not_before = max(d.not_before, self._clock() + retry_after_s)
            d.limiter.pause(retry_after_s)

    def abandoned(self) -> None:
        """The client went away: no verdict on the deployment."""
        if not self.ended:
            self.ended = True
            self.deployment.breaker.neutral(self.probe)
            self.deployment.limiter.release(ok=False)

    def outrun(self) -> None:
        """Another hedge answered first. The time waited is a lower bound of this one's
        time to first byte, and is kept as a sample: dropping it would leave only the
        fast answers in the statistics, and the hedge delay would shrink to nothing."""
        if not self.ended:
            self.abandoned()
            self.deployment.stats.observe(self._clock() - self.started)


@dataclass(slots=True)
class Won(Generic[T]):
    value: T
    lease: Lease
    target: Target


class _RouteSpent(Exception):
    def __init__(self, error: GatewayError, failure: Failure, window: int = 0) -> None:
        super().__init__(error.message)
        self.error = error
        self.failure = failure
        self.window = window  # the context window that was too small, if that was it


class Dispatcher:
    def __init__(
        self,
        router: Router,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.router = router
        self._clock = clock
        self._rng = rng or random.Random()
        self.hedges_started = 0
        self.hedges_won = 0

    async def run(
        self,
        route: str,
        attempt: Attempt[T],
        *,
        deadline: float,
        count: Callable[[], None],
        discard: Discard[T] | None = None,
        client_deadline: bool = False,
        yield_to: YieldTo | None = None,
    ) -> Won[T]:
        """The first successful attempt, trying the route and then its fallbacks.

        `count` is called once per attempt made (for `x-flywheel-attempts`); `discard`
        releases the result of a hedge that lost. The winner's lease is still open:
        the caller ends it (at once for JSON, when the stream ends for streams).
        `client_deadline`: the client set the deadline, so running out of it is not the
        upstream's fault. `yield_to(route, deployment)` is awaited before each attempt
        takes a deployment's slot (a batch line waiting out live traffic): the seconds
        it waited are added to the deadline, and the slot stays free for live requests
        meanwhile.
        """
        last: _RouteSpent | None = None
        need_window = 0
        for name in self._chain(route):
            if need_window and self.router.context_window(name) <= need_window:
                continue
            try:
                return await self._on_route(
                    name, attempt, deadline, count, discard, client_deadline, yield_to
                )
            except ServiceUnavailableError as e:
                last = _RouteSpent(e, Failure.UPSTREAM)  # no usable deployment: next route
            except _RouteSpent as spent:
                last = spent
                if spent.failure is Failure.CLIENT or spent.failure is Failure.DEADLINE:
                    break
                if spent.failure is Failure.CONTEXT:
                    need_window = max(need_window, spent.window or 1)
        assert last is not None
        raise last.error

    def _chain(self, route: str) -> list[str]:
        """The route, then its fallbacks breadth first, each once."""
        order, queue = [route], [route]
        while queue:
            for nxt in self.router.route(queue.pop(0)).fallbacks:
                if nxt not in order:
                    order.append(nxt)
                    queue.append(nxt)
        return order

    async def _on_route(
        self,
        name: str,
        attempt: Attempt[T],
        deadline: float,
        count: Callable[[], None],
        discard: Discard[T] | None,
        client_deadline: bool,
        yield_to: YieldTo | None = None,
    ) -> Won[T]:
        config = self.router.route(name)
        ordered = self.router.ordered(name)
        tried: set[str] = set()
        saturated: set[str] = set()
        failures = 0
        last: tuple[GatewayError, Failure] | None = None
        while True:
            now = self._clock()
            if now >= deadline:
                err = last[0] if last else UpstreamTimeoutError("the request's deadline passed")
                raise _RouteSpent(err, Failure.DEADLINE if client_deadline else Failure.UPSTREAM)
            d = self._pick(ordered, tried, now, probe=not tried)
            if d is None:
                if saturated:
                    # Waited the bounded time at every limit there was: answer now.
                    raise _RouteSpent(self._saturated(name), Failure.UPSTREAM)
                if not any(x.not_before > now for x in ordered):
                    if last is None:
                        raise _RouteSpent(self._all_open(name, ordered, now), Failure.UPSTREAM)
                    if not any(x.usable(now) for x in ordered):
                        # Every breaker is open and this request's try failed (a forced
                        # probe, or the failure that opened them): on to the fallbacks,
                        # not a wait for the next forced probe.
                        raise _RouteSpent(*last)
                await self._wait_for_turn(name, ordered, failures, last, deadline)
                tried.clear()
                continue
            tried.add(d.name)
            if yield_to is not None:
                deadline += await yield_to(name, d.name)
            lease = await self._acquire(d, ordered, deadline)
            if lease is None:
                saturated.add(d.name)
                continue
            hedge = config.hedging if (config.hedging and config.hedging.enabled) else None
            try:
                if hedge is not None and failures == 0:
                    return await self._hedged(
                        d,
                        lease,
                        ordered,
                        hedge.quantile,
                        hedge.min_delay_ms / 1000,
                        attempt,
                        deadline,
                        count,
                        discard,
                    )
                count()
                target = self.router.target(d, deadline - self._clock())
                return Won(await attempt(target), lease, target)
            except GatewayError as e:
                out_of_time = client_deadline and deadline - self._clock() < 0.05
                failure = classify(e, client_deadline=out_of_time)
                lease.failed(failure, _retry_after(e))
                last = (e, failure)
                if failure in (Failure.CLIENT, Failure.CONTEXT, Failure.DEADLINE):
                    raise _RouteSpent(e, failure, d.config.context_window or 0) from e
                if failure is Failure.MISCONFIGURED:
                    # Never this deployment again for this request (it is in `tried`).
                    if self._pick(ordered, tried, self._clock(), probe=False) is None:
                        raise _RouteSpent(e, Failure.UPSTREAM) from e
                    continue
                failures += 1
                if failures > config.retries:
                    raise _RouteSpent(e, failure) from e
            except BaseException:
                lease.abandoned()
                raise

    async def _wait_for_turn(
        self,
        name: str,
        ordered: list[Deployment],
        failures: int,
        last: tuple[GatewayError, Failure] | None,
        deadline: float,
    ) -> None:
        """Nothing can be tried now: back off (never before Retry-After), or give up."""
        now = self._clock()
        soonest = min(d.not_before for d in ordered)
        wait = max(soonest - now, 0.0)
        if last is not None:
            jitter = self._rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**failures))
            wait = max(wait, jitter)
        if now + wait >= deadline:
            if last is not None:
                raise _RouteSpent(*last)
            raise _RouteSpent(
                RateLimitError(
                    f"every deployment of route {name!r} asked to wait (Retry-After)",
                    headers={"Retry-After": str(max(1, round(wait)))},
                ),
                Failure.RATE_LIMITED,
            )
        await asyncio.sleep(wait)

    def _pick(
        self, ordered: list[Deployment], tried: set[str], now: float, *, probe: bool
    ) -> Deployment | None:
        for d in ordered:
            if d.name not in tried and d.usable(now):
                return d
        if probe:
            # Every deployment's breaker is open: probe the one closest to half-open
            # rather than fail at once. (One inside Retry-After is waited for instead.)
            ready = [d for d in ordered if d.not_before <= now and d.breaker.may_force_probe()]
            if ready:
                chosen = min(ready, key=lambda d: d.breaker.open_until)
                chosen.breaker.forced()
                return chosen
        return None

    async def _acquire(
        self, d: Deployment, ordered: list[Deployment], deadline: float
    ) -> Lease | None:
        if d.limiter.try_acquire():
            return Lease(d, self._clock)
        others = [o for o in ordered if o is not d and o.usable(self._clock())]
        if any(o.limiter.in_flight < o.limiter.limit for o in others):
            return None  # another deployment has room: go there instead of waiting
        typical = d.stats.ewma_s or 1.0
        factor = self.router.route(d.route).concurrency.max_wait_factor
        wait = min(typical * factor, max(0.0, deadline - self._clock()))
        if await d.limiter.acquire(wait):
            return Lease(d, self._clock)
        return None

    def _all_open(self, name: str, ordered: list[Deployment], now: float) -> GatewayError:
        """Every breaker is open and no forced probe may go now (one is out, or one went
        within FORCED_PROBE_GAP_S): a fast 503 until half-open."""
        wait = min(max(d.breaker.open_until - now, 0.0) for d in ordered)
        return ServiceUnavailableError(
            f"every deployment of route {name!r} is failing; retry later",
            code="deployments_unavailable",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    @staticmethod
    def _saturated(name: str) -> GatewayError:
        return ServiceUnavailableError(
            f"every deployment of route {name!r} is at its concurrency limit",
            code="deployments_saturated",
            headers={"Retry-After": "1"},
        )

    async def _hedged(
        self,
        first: Deployment,
        lease: Lease,
        ordered: list[Deployment],
        quantile: float,
        min_delay_s: float,
        attempt: Attempt[T],
        deadline: float,
        count: Callable[[], None],
        discard: Discard[T] | None,
    ) -> Won[T]:
        """Start on `first`; if it has not answered by its usual p-quantile time to first
        byte, start the same request on another deployment. First success wins."""
        count()
        t1 = self.router.target(first, deadline - self._clock())
        tasks: dict[asyncio.Task[T], tuple[Lease, Target]] = {
            asyncio.ensure_future(attempt(t1)): (lease, t1)
        }
        delay = first.stats.ttfb_percentile(quantile)
        try:
            if delay is not None:
                done, _ = await asyncio.wait(tasks, timeout=max(delay, min_delay_s))
                if not done:
                    self._add_hedge(first, ordered, attempt, deadline, count, tasks)
            return await self._first_success(tasks, deadline, discard)
        finally:
            for task, (other, _) in tasks.items():
                if not task.done():
                    task.cancel()
                    other.abandoned()

    def _add_hedge(
        self,
        first: Deployment,
        ordered: list[Deployment],
        attempt: Attempt[T],
        deadline: float,
        count: Callable[[], None],
        tasks: dict[asyncio.Task[T], tuple[Lease, Target]],
    ) -> None:
        now = self._clock()
        for d in ordered:
            if d is first or not d.usable(now) or not d.limiter.try_acquire():
                continue
            count()
            self.hedges_started += 1
            target = self.router.target(d, deadline - now)
            tasks[asyncio.ensure_future(attempt(target))] = (Lease(d, self._clock), target)
            return

    async def _first_success(
        self,
        tasks: dict[asyncio.Task[T], tuple[Lease, Target]],
        deadline: float,
        discard: Discard[T] | None,
    ) -> Won[T]:
        pending = set(tasks)
        error: GatewayError | None = None
        while pending:
            done, pending = await asyncio.wait(
                pending,
                timeout=max(0.0, deadline - self._clock()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                break
            for task in done:
                lease, target = tasks[task]
                exc = task.exception()
                if exc is None:
                    if len(tasks) > 1 and lease is not next(iter(tasks.values()))[0]:
                        self.hedges_won += 1
                    await self._discard_rest(tasks, task, discard)
                    return Won(task.result(), lease, target)
                if not isinstance(exc, GatewayError):
                    # A bug, not the upstream: end the lease (no verdict) and say so.
                    lease.abandoned()
                    raise UpstreamError("an attempt failed inside the gateway") from exc
                # Timeouts here are the attempt's own: the deadline is checked by wait().
                lease.failed(classify(exc, client_deadline=False), _retry_after(exc))
                error = exc
        raise error or UpstreamTimeoutError("the request's deadline passed")

    @staticmethod
    async def _discard_rest(
        tasks: dict[asyncio.Task[T], tuple[Lease, Target]],
        winner: asyncio.Task[T],
        discard: Discard[T] | None,
    ) -> None:
        for task, (lease, _) in tasks.items():
            if task is winner:
                continue
            if task.done() and not task.cancelled() and task.exception() is None:
                lease.abandoned()
                if discard is not None:
                    with contextlib.suppress(GatewayError):
                        await discard(task.result())
            elif not task.done():
                task.cancel()
                lease.outrun()


def _retry_after(e: GatewayError) -> float | None:
    return e.retry_after if isinstance(e, UpstreamStatusError) else None
