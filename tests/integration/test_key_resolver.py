"""The key resolver against the real database and Redis: one lookup however many
requests arrive at once, and none waited for once a key is known."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth.keys import KeyCreate, KeyStore, hash_key
from app.auth.resolver import KeyResolver
from app.store.schema import ApiKey


class CountingStore(KeyStore):
    """The real store, counting its database lookups."""

    lookups = 0

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        self.lookups += 1
        return await super().by_hash(key_hash)


async def test_concurrent_requests_share_one_lookup_and_never_wait_for_a_refresh(
    engine: AsyncEngine, redis_url: str, key_prefix: str
) -> None:
    store = CountingStore(engine)
    _, secret = await store.create(KeyCreate(name="herd"))
    redis = Redis.from_url(redis_url)
    prefix = f"{key_prefix}res{uuid.uuid4().hex[:6]}:"
    resolver = KeyResolver(store, redis, prefix, cache_s=0.05, miss_cache_s=0.05)
    try:
        first = await asyncio.gather(*(resolver.resolve(secret) for _ in range(100)))
        assert {info.name for info in first if info is not None} == {"herd"}
        assert store.lookups == 1
        unknown = await asyncio.gather(*(resolver.resolve("fw-nope") for _ in range(100)))
        assert unknown == [None] * 100
        assert store.lookups == 2
        await asyncio.sleep(0.1)  # both entries expired
        await redis.delete(f"{prefix}keyinfo:{hash_key(secret)}")  # make it ask the database
        again = await asyncio.gather(*(resolver.resolve(secret) for _ in range(100)))
        assert all(info is not None for info in again)  # answered from the expired entry
        await asyncio.sleep(0.05)
        assert store.lookups == 3  # refreshed once, in the background
    finally:
        keys = [k async for k in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
