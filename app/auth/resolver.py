"""Who is calling: a presented key resolved without the database on the hot path.

Lookups go to an in-process cache first, then Redis, then the database; what the
database says (a key, or that there is none) is cached in both, misses briefly. Changes
(revoke, update) delete the Redis entry and are announced on a pub/sub channel that
every replica follows, so they take effect everywhere within about a second; the
in-process TTL bounds staleness should an announcement be missed. With the database
down, a key resolved before keeps working for `stale_s`; an unknown one gets 503 after at
most `timeout_s`, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth.keys import KeyStore, hash_key
from app.background import stop_tasks
from app.config import Settings
from app.store.redis import follow_channel
from app.store.schema import ApiKey

log = logging.getLogger("flywheel.auth")
REDIS_TTL_S = 300


class KeyLookupUnavailable(Exception):
    """Neither a cached answer nor the database: whether the key is valid is unknown."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the request path needs of a key (never its secret)."""

    id: str
    name: str
    allowed_routes: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    budget_period: str | None
    expires_at: float | None
    revoked: bool

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        expires = row.expires_at.timestamp() if row.expires_at is not None else None
        routes = tuple(row.allowed_routes) if row.allowed_routes is not None else None
        return cls(
            row.id,
            row.name,
            routes,
            row.rpm,
            row.tpm,
            row.budget_usd,
            row.budget_period,
            expires,
            row.revoked_at is not None,
        )

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def allows(self, route: str) -> bool:
        return self.allowed_routes is None or route in self.allowed_routes


def _quietly(done: asyncio.Future[KeyInfo | None]) -> None:
    """A background refresh that failed: the entry it would have replaced stays (until
    `stale_s`); the failure is only worth a debug line."""
    if not done.cancelled() and done.exception() is not None:
        log.debug("key refresh failed: %r", done.exception())


def _encode(info: KeyInfo | None) -> bytes:
    return b"null" if info is None else orjson.dumps(asdict(info))


def _decode(raw: bytes) -> KeyInfo | None:
    data = orjson.loads(raw)
    if data is None:
        return None
    routes = data["allowed_routes"]
    return KeyInfo(**{**data, "allowed_routes": None if routes is None else tuple(routes)})


@dataclass(slots=True)
class _Entry:
    info: KeyInfo | None
    fetched: float  # monotonic


class KeyResolver:
    def __init__(
        self,
        store: KeyStore,
        redis: Redis | None,
        prefix: str,
        *,
        cache_s: float = 60.0,
        miss_cache_s: float = 5.0,
        stale_s: float = 300.0,
        timeout_s: float = 1.0,
    ) -> None:
        self.store = store
        self._redis = redis
        self._prefix = prefix
        self._cache_s = cache_s
        self._miss_cache_s = miss_cache_s
        self._stale_s = stale_s
        self._timeout_s = timeout_s
        self._local: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Future[KeyInfo | None]] = {}
        self.channel = prefix + "keys:changed"

    def _redis_key(self, key_hash: str) -> str:
        return f"{self._prefix}keyinfo:{key_hash}"

    async def resolve(self, secret: str) -> KeyInfo | None:
        """The key's info (None: no such key). Raises KeyLookupUnavailable when that
        cannot be known right now.

        Only a key never seen (or forgotten: changed, or unverified for `stale_s`) waits
        for a lookup, and concurrent requests for it share one. An expired entry is
        answered from and refreshed in the background: under load, every in-flight
        request would otherwise miss at the same moment and queue on the database.
        """
        key_hash = hash_key(secret)
        entry = self._local.get(key_hash)
        if entry is not None:
            age = time.monotonic() - entry.fetched
            if age < (self._cache_s if entry.info is not None else self._miss_cache_s):
                return entry.info
            if age < self._stale_s:
                self._refresh(key_hash)
                return entry.info
        try:
            return await asyncio.shield(self._lookup(key_hash))
        except (TimeoutError, SQLAlchemyError, OSError) as e:
            log.warning("key lookup failed: %s", type(e).__name__)
            raise KeyLookupUnavailable(type(e).__name__) from e

    def _lookup(self, key_hash: str) -> asyncio.Future[KeyInfo | None]:
        """The lookup of `key_hash` in flight, started if there is none."""
        pending = self._pending.get(key_hash)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key_hash))
            self._pending[key_hash] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key_hash, None))
        return pending

    def _refresh(self, key_hash: str) -> None:
        if key_hash not in self._pending:
            self._lookup(key_hash).add_done_callback(_quietly)

    async def _load(self, key_hash: str) -> KeyInfo | None:
        async with asyncio.timeout(self._timeout_s):
            info = await self._fetch(key_hash)
        self._remember(key_hash, info)
        return info

    async def _fetch(self, key_hash: str) -> KeyInfo | None:
        cached = await self._from_redis(key_hash)
        if cached is not None:
            return cached[0]
        row = await self.store.by_hash(key_hash)
        info = None if row is None else KeyInfo.of(row)
        if self._redis is not None:
            ttl = REDIS_TTL_S if info is not None else max(1, int(self._miss_cache_s))
            with contextlib.suppress(RedisError, OSError):
                await self._redis.set(self._redis_key(key_hash), _encode(info), ex=ttl)
        return info

    async def _from_redis(self, key_hash: str) -> tuple[KeyInfo | None] | None:
        if self._redis is None:
            return None
        try:
            raw = await self._redis.get(self._redis_key(key_hash))
        except (RedisError, OSError):
            return None  # Redis away: ask the database
        return None if raw is None else (_decode(raw),)

    def _remember(self, key_hash: str, info: KeyInfo | None) -> None:
        if len(self._local) > 100_000:  # made-up keys must not grow it without bound
            self._local.clear()
        self._local[key_hash] = _Entry(info, time.monotonic())

    def forget(self, key_hash: str) -> None:
        self._local.pop(key_hash, None)

    async def announce(self, key_hash: str) -> None:
        """A key changed: drop it from Redis and from every replica's memory."""
        self.forget(key_hash)
        if self._redis is None:
            return
        await self._redis.delete(self._redis_key(key_hash))
        await self._redis.publish(self.channel, key_hash)

    async def follow(self, subscriber: Redis) -> None:
        """Apply other replicas' announcements; forever."""

        def recheck_all() -> None:
            # Anything announced while unsubscribed was missed: check every key again,
            # keeping what is known for the database-down grace.
            stale = time.monotonic() - max(self._cache_s, self._miss_cache_s)
            for entry in self._local.values():
                entry.fetched = min(entry.fetched, stale)

        await follow_channel(
            subscriber, self.channel, lambda data: self.forget(data.decode()), recheck_all
        )

    def snapshot(self) -> dict[str, Any]:
        return {"cached": len(self._local)}


class KeyService:
    """The resolver and its subscription to key changes, for the app's lifespan."""

    def __init__(self, settings: Settings, redis: Redis | None, engine: AsyncEngine) -> None:
        self.resolver = KeyResolver(
            KeyStore(engine),
            redis,
            settings.flywheel_redis_prefix,
            cache_s=settings.flywheel_key_cache_s,
            miss_cache_s=settings.flywheel_key_miss_cache_s,
            stale_s=settings.flywheel_key_stale_s,
            timeout_s=settings.flywheel_key_lookup_timeout_s,
        )
        dsn = settings.redis_dsn
        # Its own connection without a read timeout: a subscription waits indefinitely.
        self._subscriber = None if dsn is None else Redis.from_url(dsn, socket_connect_timeout=2)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._subscriber is not None:
            self._task = asyncio.create_task(
                self.resolver.follow(self._subscriber), name="key-changes"
            )

    async def stop(self) -> None:
        await stop_tasks(self._task)
        if self._subscriber is not None:
            await self._subscriber.aclose()
