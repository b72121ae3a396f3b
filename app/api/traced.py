"""A span per upstream attempt (retries, fallbacks and hedges each get their own)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from app.api.exchange import Exchange
from app.observability.tracing import Tracing
from app.routing.router import Target

T = TypeVar("T")


def traced_attempt(
    tracing: Tracing, exchange: Exchange, attempt: Callable[[Target], Awaitable[T]]
) -> Callable[[Target], Awaitable[T]]:
    """`attempt` itself when tracing is off (no wrapper on the path); else each call in a
    span whose child is the upstream HTTP request, carrying our `traceparent`. A batch's
    line first awaits its tag's `before_attempt` (the yield to live traffic)."""
    if exchange.batch is not None and exchange.batch.before_attempt is not None:
        attempt = _after(exchange.batch.before_attempt, attempt)
    if not tracing.enabled:
        return attempt

    async def traced(target: Target) -> T:
        d = target.deployment
        attributes = {
            "gen_ai.system": d.provider,
            "gen_ai.request.model": d.model,
            "flywheel.route": target.route,
            "flywheel.deployment": d.name,
            "flywheel.attempt": exchange.attempts,
        }
        with tracing.span("upstream " + d.name, attributes):
            return await attempt(target)

    return traced


def _after(
    first: Callable[[Target], Awaitable[object]], attempt: Callable[[Target], Awaitable[T]]
) -> Callable[[Target], Awaitable[T]]:
    async def then(target: Target) -> T:
        await first(target)
        return await attempt(target)

    return then
