"""The response cache: L1 then L2 lookups, writes off the critical path, single-flight.

Single-flight: the first miss for a key leads; identical requests that arrive while it
runs wait for its answer instead of calling the upstream too. Across replicas the leader
also takes a short Redis lock; a replica that finds the lock taken polls L2 for the
answer for a bounded time, then proceeds on its own. A leader that fails or is cancelled
releases its waiters, who then each proceed on their own (no chain of retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from app.background import stop_tasks
from app.cache.entry import Cached, CorruptEntry, decode, encode
from app.cache.keys import route_pattern
from app.cache.l1 import L1Cache
from app.cache.l2 import Down, L2Cache, make_l2_client
from app.cache.stats import CacheStats
from app.config import Settings
from app.store.redis import follow_channel

log = logging.getLogger("flywheel.cache")

POLL_FIRST_S = 0.01
POLL_MAX_S = 0.1
HOT_FLUSH_S = 5.0


@dataclass(slots=True)
class Joined:
    """What `join` found: an answer (and its tier), or the lead (`flight`) to fill it."""

    cached: Cached | None = None
    tier: str | None = None
    flight: Flight | None = None


class Flight:
    """The leader's hold on a key; `finish` exactly once, with the answer or None."""

    __slots__ = ("_cache", "_future", "_timer", "key", "token")

    def __init__(
        self,
        cache: ResponseCache,
        key: str,
        future: asyncio.Future[Cached | None],
        expires_s: float,
    ) -> None:
        self._cache = cache
        self._future = future
        self.key = key
        self.token: str | None = None  # the Redis fill lock's token, while held
        # A leader whose response was never even started (the client left first) must
        # not hold its waiters, or the key, beyond the request's own deadline.
        self._timer = asyncio.get_running_loop().call_later(expires_s, self.finish)

    def finish(self, cached: Cached | None = None, ttl_s: float = 0.0) -> None:
        """Release the waiters with the answer (stored for `ttl_s`), or with nothing: a
        failed or cancelled leader, whose waiters then go on their own."""
        self.share(cached)
        token, self.token = self.token, None
        if cached is not None:
            self._cache.put(self.key, cached, ttl_s, unlock=token)
        elif token is not None:
            self._cache._background(self._cache._unlock(self.key, token))

    def share(self, cached: Cached | None) -> None:
        """Release the waiters with `cached` without storing it (it came from L2)."""
        self._timer.cancel()
        flights = self._cache._flights
        if flights.get(self.key) is self._future:
            del flights[self.key]
        if not self._future.done():
            self._future.set_result(cached)


class ResponseCache:
    def __init__(
        self,
        l1: L1Cache[Cached],
        l2: L2Cache | None,
        *,
        compress_min_bytes: int = 1024,
        replica_wait_s: float = 10.0,
    ) -> None:
        self.l1 = l1
        self.l2 = l2
        self.compress_min_bytes = compress_min_bytes
        self.replica_wait_s = replica_wait_s
        self.stats = CacheStats()
        self._flights: dict[str, asyncio.Future[Cached | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hot: Counter[str] = Counter()

    # -- lookups -------------------------------------------------------------------

    def get_l1(self, key: str) -> Cached | None:
        started = time.perf_counter()
        cached = self.l1.get(key)
        if cached is None:
            self.stats.l1.misses += 1
            return None
        self.stats.l1.hit(time.perf_counter() - started)
        if self.l2 is not None:  # hit counts only matter for pre-warming from L2
            self._hot[key] += 1
        return cached

    async def get_l2(self, key: str, ttl_s: float) -> Cached | None:
        """L2's answer (promoted to L1), or None on a miss or when L2 is unavailable."""
        if self.l2 is None:
            return None
        started = time.perf_counter()
        try:
            value = await self.l2.get(key)
        except Down:
            return None
        cached = await self._decode(key, value)
        if cached is None:
            self.stats.l2.misses += 1
            return None
        self.stats.l2.hit(time.perf_counter() - started)
        self._promote(key, cached, ttl_s)
        return cached

    async def lookup(
        self, key: str, *, ttl_s: float, left_s: float, lead: bool, l1_checked: bool = False
    ) -> Joined:
        """L1, then L2, then (when `lead`, i.e. the answer will be stored) single-flight:
        a hit, or the flight this request leads (none when it proceeds on its own)."""
        cached = None if l1_checked else self.get_l1(key)
        if cached is not None:
            return Joined(cached, "hit-l1")
        cached = await self.get_l2(key, ttl_s)
        if cached is not None:
            return Joined(cached, "hit-l2")
        if not lead:
            return Joined()
        return await self.join(key, left_s=max(0.0, left_s), ttl_s=ttl_s)

    async def _decode(self, key: str, value: bytes | None) -> Cached | None:
        if value is None:
            return None
        try:
            return await decode(value)
        except CorruptEntry as e:
            self.stats.corrupt += 1
            log.warning("unreadable cache entry %s dropped: %s", key, e)
            if self.l2 is not None:
                self._background(self._forget(key))
            return None

    def _promote(self, key: str, cached: Cached, ttl_s: float) -> None:
        # The copy may outlive the L2 value by up to a TTL: a purge reaches every
        # replica's L1 by pub/sub, and an expiry is a freshness bound, not a contract.
        self.l1.put(key, cached, size=cached.size, ttl_s=ttl_s, route=cached.route)
        if self.l2 is not None:
            self._hot[key] += 1

    # -- writes --------------------------------------------------------------------

    def put(self, key: str, cached: Cached, ttl_s: float, *, unlock: str | None = None) -> None:
        """Store in L1 now and in L2 in the background (never on the response's path)."""
        self.stats.stores += 1
        if not self.l1.put(key, cached, size=cached.size, ttl_s=ttl_s, route=cached.route):
            self.stats.not_stored += 1
        if self.l2 is not None:
            self._hot[key] += 1
            self._background(self._write(key, cached, ttl_s, unlock))

    async def _write(self, key: str, cached: Cached, ttl_s: float, unlock: str | None) -> None:
        assert self.l2 is not None
        try:
            await self.l2.set(key, await encode(cached, self.compress_min_bytes), ttl_s)
            self.stats.l2_writes += 1
        except Down:
            self.stats.l2_write_failures += 1
        if unlock is not None:
            await self._unlock(key, unlock)

    async def _unlock(self, key: str, token: str) -> None:
        if self.l2 is not None:
            with contextlib.suppress(Down):
                await self.l2.unlock(key, token)

    async def _forget(self, key: str) -> None:
        assert self.l2 is not None
        with contextlib.suppress(Down):
            await self.l2.delete(key)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- single-flight -------------------------------------------------------------

    async def join(self, key: str, *, left_s: float, ttl_s: float) -> Joined:
        """Wait for an identical request already running here (up to `left_s`, the
        request's own time), or lead; a leader whose fill lock another replica holds
        first waits up to `replica_wait_s` for that replica's answer."""
        waiting = self._flights.get(key)
        if waiting is not None:
            self.stats.coalesced += 1
            try:
                async with asyncio.timeout(left_s):
                    cached = await asyncio.shield(waiting)
            except TimeoutError:
                cached = None
            return Joined(cached, "hit-l1" if cached is not None else None)
        future: asyncio.Future[Cached | None] = asyncio.get_running_loop().create_future()
        self._flights[key] = future
        flight = Flight(self, key, future, left_s + 1.0)
        if self.l2 is None:
            return Joined(flight=flight)
        try:
            return await self._lead(flight, left_s, ttl_s)
        except BaseException:
            flight.finish()  # cancelled while taking the lock or polling
            raise

    async def _lead(self, flight: Flight, left_s: float, ttl_s: float) -> Joined:
        assert self.l2 is not None
        try:
            flight.token = await self.l2.lock(flight.key, left_s + 1.0)
        except Down:
            return Joined(flight=flight)
        if flight.token is not None:
            return Joined(flight=flight)
        self.stats.waited_for_replica += 1
        cached = await self._await_replica(flight.key, min(self.replica_wait_s, left_s), ttl_s)
        if cached is None:
            return Joined(flight=flight)  # lead here after all, without the lock
        flight.share(cached)  # and the local waiters get the other replica's answer
        return Joined(cached, "hit-l2")

    async def _await_replica(self, key: str, wait_s: float, ttl_s: float) -> Cached | None:
        assert self.l2 is not None
        until = time.monotonic() + wait_s
        pause = POLL_FIRST_S
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX_S)
            try:
                value, locked = await self.l2.peek(key)
            except Down:
                return None
            cached = await self._decode(key, value)
            if cached is not None:
                self.stats.l2.hit(0.0)
                self._promote(key, cached, ttl_s)
                return cached
            if not locked:
                return None  # the other replica gave up (failed or cancelled)
        return None

    # -- operations ----------------------------------------------------------------

    async def purge(self, route: str | None) -> dict[str, int | bool]:
        """Drop `route`'s answers (all when None) here, in L2 and on every replica's L1."""
        local = self.l1.purge(route)
        removed, shared = 0, False
        if self.l2 is not None:
            with contextlib.suppress(Down):
                removed = await self.l2.purge(route_pattern(self.l2.prefix, route))
                await self.l2.publish_purge(route)
                shared = True
        return {"l1_removed": local, "l2_removed": removed, "l2_reachable": shared}

    async def prewarm(self, limit: int) -> dict[str, int | bool]:
        """Load L1 with the most-hit answers still in L2."""
        if self.l2 is None:
            return {"loaded": 0, "l2_reachable": False}
        await self.flush_hot()
        try:
            hottest = await self.l2.hottest(limit)
        except Down:
            return {"loaded": 0, "l2_reachable": False}
        loaded = 0
        for key, value, left_ms in hottest:
            cached = await self._decode(key, value)
            if cached is not None and self.l1.put(
                key, cached, size=cached.size, ttl_s=left_ms / 1000, route=cached.route
            ):
                loaded += 1
        return {"loaded": loaded, "l2_reachable": True}

    async def flush_hot(self) -> None:
        if self.l2 is None or not self._hot:
            return
        counts, self._hot = self._hot, Counter()
        with contextlib.suppress(Down):
            await self.l2.count_hits(counts)

    async def run_background(self) -> None:
        """Ship hit counts for pre-warming and apply other replicas' purges; forever."""
        subscriber = asyncio.create_task(self._follow_purges())
        try:
            while True:
                await asyncio.sleep(HOT_FLUSH_S)
                await self.flush_hot()
        finally:
            await stop_tasks(subscriber)

    async def _follow_purges(self) -> None:
        assert self.l2 is not None

        def purge(data: bytes) -> None:
            route = data.decode()
            self.l1.purge(None if route == "*" else route)

        await follow_channel(self.l2.subscriber, self.l2.purge_channel, purge)

    async def stop(self) -> None:
        await self.flush_hot()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        if self.l2 is not None:
            await self.l2.redis.aclose()
            await self.l2.subscriber.aclose()

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "l1": {
                **s.l1.summary(),
                "entries": len(self.l1),
                "bytes": self.l1.bytes,
                "max_entries": self.l1.max_entries,
                "max_bytes": self.l1.max_bytes,
                "evictions": self.l1.evictions,
                "expirations": self.l1.expirations,
            },
            "l2": {
                **s.l2.summary(),
                "configured": self.l2 is not None,
                "up": self.l2.up if self.l2 is not None else False,
                "failures": self.l2.failures if self.l2 is not None else 0,
                "outages": self.l2.outages if self.l2 is not None else 0,
                "writes": s.l2_writes,
                "write_failures": s.l2_write_failures,
                "corrupt": s.corrupt,
            },
            "stores": s.stores,
            "not_stored": s.not_stored,
            "coalesced": s.coalesced,
            "waited_for_replica": s.waited_for_replica,
            "in_flight": len(self._flights),
        }


def make_cache(settings: Settings) -> ResponseCache:
    """L1 always; L2 when there is a Redis, on its own bounded pool with short timeouts."""
    l1: L1Cache[Cached] = L1Cache(
        settings.flywheel_cache_l1_max_entries, settings.flywheel_cache_l1_max_bytes
    )
    l2 = None
    if settings.redis_dsn is not None:
        timeout = settings.flywheel_cache_redis_timeout_s
        client = make_l2_client(
            settings.redis_dsn,
            timeout_s=timeout,
            max_connections=settings.flywheel_cache_redis_max_connections,
        )
        # Pub/sub waits for messages indefinitely: its connection must not time out reads.
        subscriber = Redis.from_url(settings.redis_dsn, socket_connect_timeout=timeout)
        l2 = L2Cache(
            client, prefix=settings.flywheel_redis_prefix, timeout_s=timeout, subscriber=subscriber
        )
    return ResponseCache(
        l1,
        l2,
        compress_min_bytes=settings.flywheel_cache_compress_min_bytes,
        replica_wait_s=settings.flywheel_cache_lock_wait_s,
    )
