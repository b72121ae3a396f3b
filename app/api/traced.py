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
    span whose child is the upstream HTTP request, carrying our `traceparent`."""
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
