"""Live traffic goes first: batch lines yield while live requests queue for a deployment.

Each gateway replica publishes, every 100 ms, which of its deployments have requests
waiting in their concurrency limiter: `{prefix}live-queued:{route}/{deployment}` is a
sorted set of replica id → the time the claim lapses (about a second ahead, so a dead
replica's claim lapses by itself). A worker asks, before a batch line calls an upstream,
whether any claim on that deployment is still current, and waits while one is.

Both sides read the time from Redis (`TIME` inside the scripts), never from their own
host, so clocks that disagree between gateway and worker hosts cannot make a claim look
current forever or never. The publisher runs beside the request path and reads only
in-process limiter state; no request waits on Redis for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.routing.router import Router

log = logging.getLogger("flywheel.routing")

CLAIM_TTL_S = 1.0
# A bound on each call beyond the client's own socket timeouts: a tick or a poll is
# never held longer than this by a Redis that accepts but does not answer.
CALL_TIMEOUT_S = 1.0
# A claimed key outlives its newest claim by this factor, so keys of replicas that died
# while claiming do not stay behind.
KEY_KEEP_FACTOR = 10

# KEYS: the keys to claim, then the keys to release. ARGV: replica id, claim TTL (s),
# how many of KEYS are claims, how long a claimed key is kept (ms).
_PUBLISH = """
local t = redis.call('TIME')
local ttl = tonumber(ARGV[2])
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + ttl
local claims = tonumber(ARGV[3])
for i = 1, #KEYS do
  if i <= claims then
    redis.call('ZADD', KEYS[i], expires, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
  else
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
end
return #KEYS
"""

# Claims that have not lapsed yet, by the server's clock.
_CURRENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.6f', now), '+inf')
"""


def live_queue_key(prefix: str, route: str, deployment: str) -> str:
    return f"{prefix}live-queued:{route}/{deployment}"


def replica_id() -> str:
    """This process's name in the claims (several processes may share a host)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LiveQueuePublisher:
    """A gateway replica's claims on the deployments its live requests queue for."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        router: Router,
        replica_id: str,
        ttl_s: float = CLAIM_TTL_S,
    ) -> None:
        self._prefix = prefix
        self._router = router
        self._replica = replica_id
        self._ttl_s = ttl_s
        self._script = redis.register_script(_PUBLISH)
        self._claimed: set[tuple[str, str]] = set()

    def queued_now(self) -> set[tuple[str, str]]:
        return {
            (d.route, d.name)
            for pool in self._router.deployments.values()
            for d in pool
            if d.limiter.queued
        }

    async def publish_once(self) -> None:
        """Claim what queues now, release what no longer does: one round trip, and none
        while nothing queues or was claimed. Redis errors are the caller's to log."""
        queued = self.queued_now()
        released = self._claimed - queued
        # A claim that could not be released lapses by itself within the TTL, so the
        # set is replaced even on failure: an outage costs one call per tick, no more.
        self._claimed = queued
        if not queued and not released:
            return
        keep_ms = math.ceil(self._ttl_s * 1000 * KEY_KEEP_FACTOR)
        keys = [live_queue_key(self._prefix, r, d) for r, d in (*sorted(queued), *released)]
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._script(keys=keys, args=[self._replica, self._ttl_s, len(queued), keep_ms])

    async def run_forever(self, interval_s: float = 0.1) -> None:
        failing = False
        while True:
            try:
                await self.publish_once()
                failing = False
            except (RedisError, OSError, TimeoutError) as e:
                if not failing:  # one warning per outage, not one per tick
                    log.warning(
                        "live queue claims not published (%s); batch work may not yield",
                        type(e).__name__,
                    )
                failing = True
            await asyncio.sleep(interval_s)


class LiveQueueGate:
    """A worker's check before a batch line calls a deployment's upstream.

    Answers are kept per deployment for `poll_s`, and one Redis call is in flight per
    deployment at a time, so hundreds of lines waiting on one deployment make one call
    per poll. `yields` and `yield_seconds` count the waits, for the batch metrics.
    """

    def __init__(self, redis: Redis, prefix: str, poll_s: float = 0.05) -> None:
        self._prefix = prefix
        self.poll_s = poll_s
        self._script = redis.register_script(_CURRENT)
        self._known: dict[str, tuple[float, bool]] = {}  # key → (monotonic time, busy)
        self._asking: dict[str, asyncio.Task[bool]] = {}
        self._failing = False
        self.yields = 0
        self.yield_seconds = 0.0

    async def wait_clear(
        self, route: str, deployment: str, stop: asyncio.Event | None = None
    ) -> float:
        """Wait while live requests queue for the deployment in any replica (or until
        `stop` is set); the seconds waited, 0.0 when it was clear at once."""
        key = live_queue_key(self._prefix, route, deployment)
        started = time.monotonic()
        waited = False
        while not (stop is not None and stop.is_set()) and await self._busy(key):
            waited = True
            await self._pause(stop)
        if not waited:
            return 0.0
        seconds = time.monotonic() - started
        self.yields += 1
        self.yield_seconds += seconds
        return seconds

    async def _pause(self, stop: asyncio.Event | None) -> None:
        if stop is None:
            await asyncio.sleep(self.poll_s)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.poll_s)

    async def _busy(self, key: str) -> bool:
        known = self._known.get(key)
        if known is not None and time.monotonic() - known[0] < self.poll_s:
            return known[1]
        task = self._asking.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(key), name="live-queue-gate")
            self._asking[key] = task
        # Shielded: one line giving up (cancelled) must not cancel the others' answer.
        return await asyncio.shield(task)

    async def _ask(self, key: str) -> bool:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                busy = int(await self._script(keys=[key])) > 0
            self._failing = False
        except (RedisError, OSError, TimeoutError) as e:
            # Clear: batch work must not stall for as long as Redis is down.
            if not self._failing:
                log.warning(
                    "live queue not readable (%s); batch lines go without yielding",
                    type(e).__name__,
                )
            self._failing = True
            busy = False
        finally:
            self._asking.pop(key, None)
        self._known[key] = (time.monotonic(), busy)
        return busy
