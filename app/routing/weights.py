"""Cycle-learned routing weights, read from Redis for `adaptive` routes; breaker cooldowns.

The virtuous cycle writes `{prefix}weights:{route}` (a hash: deployment → weight); every
gateway replica reads it every few seconds, so N replicas route as one. Until the cycle
has written a route's weights (or while Redis is down) the configured weights apply.

On the same tick a replica with open breakers publishes when each will reopen to
`{prefix}breakers` (`route/deployment` → epoch seconds; one round trip, none when no
breaker is open), and a starting replica holds open the deployments whose published
cooldown is still running, instead of re-learning a dead upstream from failed requests.
Snapshots carry this hash, so a restore brings the cooldowns back to starting replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.routing.router import Router

log = logging.getLogger("flywheel.routing")

REFRESH_S = 5.0
# Keeps the later reopening time per deployment (replicas may disagree) and forgets the
# ones that have passed, in one round trip.
_PUBLISH = """
local now = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local old = tonumber(redis.call('hget', KEYS[1], ARGV[i]) or '0') or 0
  if tonumber(ARGV[i + 1]) > old then redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local all = redis.call('hgetall', KEYS[1])
for i = 1, #all, 2 do
  local until_s = tonumber(all[i + 1])
  if until_s == nil or until_s <= now then redis.call('hdel', KEYS[1], all[i]) end
end
return 0
"""


def weights_key(prefix: str, route: str) -> str:
    return f"{prefix}weights:{route}"


def breakers_key(prefix: str) -> str:
    return f"{prefix}breakers"


async def publish_breakers(redis: Redis, prefix: str, router: Router) -> int:
    """Publish this replica's open breakers' reopening times; how many were open."""
    now = time.time()
    args = [f"{now:.3f}"]
    for pool in router.deployments.values():
        for d in pool:
            if d.breaker.current() == "open":
                left = d.breaker.open_until - d.breaker.clock()
                args += [f"{d.route}/{d.name}", f"{now + left:.3f}"]
    if len(args) > 1:
        await cast(Awaitable[int], redis.eval(_PUBLISH, 1, breakers_key(prefix), *args))
    return (len(args) - 1) // 2


async def seed_breakers(redis: Redis, prefix: str, router: Router) -> int:
    """Hold open the deployments whose published cooldown is still running; how many."""
    raw = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(breakers_key(prefix)))
    now = time.time()
    seeded = 0
    for pool in router.deployments.values():
        for d in pool:
            value = raw.get(f"{d.route}/{d.name}".encode())
            try:
                left = float(value) - now if value is not None else 0.0
            except ValueError:
                continue
            if left > 0 and d.breaker.current() == "closed":
                d.breaker.hold_open(left)
                seeded += 1
    if seeded:
        log.info("%d deployment(s) held open from published breaker cooldowns", seeded)
    return seeded


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
    seeded = False
    while True:
        try:
            if not seeded:  # once, on the first tick Redis answers
                await seed_breakers(redis, prefix, router)
                seeded = True
            await refresh_once(redis, prefix, router)
            await publish_breakers(redis, prefix, router)
            failing = False
        except (RedisError, OSError) as e:
            if not failing:  # one warning per outage, not one per refresh
                log.warning(
                    "routing weights not refreshed (%s); keeping the last", type(e).__name__
                )
            failing = True
        await asyncio.sleep(every_s)
