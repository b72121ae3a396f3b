"""Cycle-learned routing weights, read from Redis for `adaptive` routes.

The virtuous cycle writes `{prefix}weights:{route}` (a hash: deployment → weight); every
gateway replica reads it every few seconds, so N replicas route as one. Until the cycle
has written a route's weights (or while Redis is down) the configured weights apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.routing.router import Router

log = logging.getLogger("flywheel.routing")

REFRESH_S = 5.0


def weights_key(prefix: str, route: str) -> str:
    return f"{prefix}weights:{route}"


async def refresh_once(redis: Redis, prefix: str, router: Router) -> None:
    for name in router.names:
        if router.route(name).strategy != "adaptive":
            continue
        raw = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(weights_key(prefix, name)))
        learned: dict[str, float] = {}
        for dep, value in raw.items():
            with contextlib.suppress(ValueError):
                learned[dep.decode()] = max(0.0, float(value))
        if learned:
            router.learned_weights[name] = learned
        else:
            router.learned_weights.pop(name, None)


async def refresh_forever(
    redis: Redis, prefix: str, router: Router, every_s: float = REFRESH_S
) -> None:
    failing = False
    while True:
        try:
            await refresh_once(redis, prefix, router)
            failing = False
        except (RedisError, OSError) as e:
            if not failing:  # one warning per outage, not one per refresh
                log.warning(
                    "routing weights not refreshed (%s); keeping the last", type(e).__name__
                )
            failing = True
        await asyncio.sleep(every_s)
