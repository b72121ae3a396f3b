"""L2: answers in Redis, every call bounded by a short timeout.

Redis trouble never fails or slows a request beyond that timeout: the first failure
marks L2 down (one warning for the whole outage, every failure counted), calls are
skipped while it is down, and after `retry_s` the next call probes it again; the first
success logs that it is back. The client has its own bounded pool, so a slow Redis cannot
pile up connections either.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

log = logging.getLogger("flywheel.cache")

T = TypeVar("T")
HOT_KEEP = 10_000  # the hottest keys remembered for pre-warming
PURGE_BATCH = 500
# Release the fill lock only if it is still ours (it may have expired and been retaken).
_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Down(Exception):
    """L2 is unavailable for this call (an outage, or the call failed just now)."""


def make_l2_client(dsn: str, *, timeout_s: float, max_connections: int) -> Redis:
    pool = BlockingConnectionPool.from_url(
        dsn,
        max_connections=max_connections,
        timeout=timeout_s,  # the wait for a free connection is bounded too
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
    )
    return Redis(connection_pool=pool)


class L2Cache:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        timeout_s: float,
        subscriber: Redis | None = None,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.subscriber = subscriber or redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._clock = clock
        self._down_since: float | None = None
        self._retry_at = 0.0
        self.failures = 0
        self.outages = 0

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def hot_key(self) -> str:
        return f"{self.prefix}cache:hot"

    @property
    def purge_channel(self) -> str:
        return f"{self.prefix}cache:purge"

    async def _run(self, op: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run a request-path call under the short timeout; failures mark L2 down."""
        if self._down_since is not None and self._clock() < self._retry_at:
            raise Down
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                result = await op()
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            raise Down from e
        if self._down_since is not None:
            log.warning("L2 cache (Redis) is back after %.1f s", self._clock() - self._down_since)
            self._down_since = None
        return result

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            log.warning("L2 cache (Redis) unavailable (%s); serving from L1 only", type(e).__name__)
        self._retry_at = now + self.retry_s

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._run(lambda: self.redis.get(key))
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._run(lambda: self.redis.set(key, value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._run(lambda: self.redis.delete(key))

    async def lock(self, key: str, ttl_s: float) -> str | None:
        """Take the cross-replica fill lock for `key`: its token, or None when another
        replica holds it. The token makes the release delete only our own lock."""
        token = secrets.token_hex(8)
        ms = max(1, int(ttl_s * 1000))
        taken = await self._run(lambda: self.redis.set(key + ":lock", token, nx=True, px=ms))
        return token if taken else None

    async def unlock(self, key: str, token: str) -> None:
        async def release() -> None:
            await self.redis.eval(_UNLOCK, 1, key + ":lock", token)  # type: ignore[misc]

        await self._run(release)

    async def peek(self, key: str) -> tuple[bytes | None, bool]:
        """The value, and whether a replica still holds the fill lock (one round trip)."""

        async def both() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                # The lock first: a value written just after reads as "still locked"
                # (poll again), never as "gave up".
                pipe.exists(key + ":lock")
                pipe.get(key)
                result: list[Any] = await pipe.execute()
                return result

        locked, value = await self._run(both)
        return value, bool(locked)

    async def count_hits(self, counts: Mapping[str, int]) -> None:
        async def bump() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, n in counts.items():
                    pipe.zincrby(self.hot_key, n, key)
                pipe.zremrangebyrank(self.hot_key, 0, -HOT_KEEP - 1)
                await pipe.execute()

        await self._admin(bump, 1.0)

    async def hottest(self, n: int) -> list[tuple[str, bytes, int]]:
        """Up to n of the most-hit keys still stored: (key, value, milliseconds left)."""

        async def read() -> list[tuple[str, bytes, int]]:
            keys = [k.decode() for k in await self.redis.zrevrange(self.hot_key, 0, n - 1)]
            if not keys:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                    pipe.pttl(key)
                flat = await pipe.execute()
            out, gone = [], []
            for i, key in enumerate(keys):
                value, left = flat[2 * i], flat[2 * i + 1]
                if value is None or left is None or left <= 0:
                    gone.append(key)
                else:
                    out.append((key, value, int(left)))
            if gone:
                await self.redis.zrem(self.hot_key, *gone)
            return out

        return await self._admin(read, 5.0)

    async def purge(self, pattern: str) -> int:
        """UNLINK every key matching `pattern` (SCAN in batches); how many went."""

        async def scan_and_unlink() -> int:
            removed = 0
            batch: list[bytes] = []
            async for key in self.redis.scan_iter(match=pattern, count=PURGE_BATCH):
                batch.append(key)
                if len(batch) >= PURGE_BATCH:
                    removed += await self.redis.unlink(*batch)
                    batch.clear()
            if batch:
                removed += await self.redis.unlink(*batch)
            return removed

        return await self._admin(scan_and_unlink, 30.0)

    async def publish_purge(self, route: str | None) -> None:
        await self._admin(lambda: self.redis.publish(self.purge_channel, route or "*"), 1.0)

    async def _admin(self, op: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """Background and admin calls: a longer bound, and a failure here says nothing
        about the request path's Redis calls, so it does not mark L2 down."""
        try:
            async with asyncio.timeout(max(timeout_s, self.timeout_s)):
                return await op()
        except (RedisError, OSError, TimeoutError) as e:
            self.failures += 1
            raise Down from e
