"""The per-key limiter against a real Redis: exact under concurrency across limiters
(as replicas would be), tokens and budgets reserved then settled, and an outage taken
to each replica's local share (or refused), logged once and counted."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.ratelimit.limiter import Limiter
from app.ratelimit.quota import Ask, Quota
from tests.integration.test_cache_redis_outage import OwnRedis


def _key() -> str:
    return "k" + uuid.uuid4().hex[:10]


async def test_requests_are_exact_across_limiters(redis_url: str, key_prefix: str) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    limiters = [Limiter(c, key_prefix, replicas=2) for c in clients]
    quota = Quota(_key(), rpm=20)
    decisions = await asyncio.gather(
        *(limiters[i % 2].reserve(quota, Ask(0, 0.0), "local") for i in range(100))
    )
    allowed = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(allowed) == 20
    assert {d.refusal for d in refused} == {"requests"}
    assert all(d.retry_after_s is not None and 0 < d.retry_after_s <= 60 for d in refused)
    assert all(d.requests is not None and d.requests.remaining == 0 for d in refused)
    assert sorted(d.requests.remaining for d in allowed if d.requests) == list(range(20))
    assert sum(lim.degraded.total() for lim in limiters) == 0
    for c in clients:
        await c.aclose()


async def test_tokens_reserved_then_settled(redis: Redis, key_prefix: str) -> None:
    limiter = Limiter(redis, key_prefix, replicas=1)
    quota = Quota(_key(), tpm=1000)
    first = await limiter.reserve(quota, Ask(600, 0.0), "local")
    assert first.allowed
    assert first.ticket is not None
    assert first.tokens is not None
    assert first.tokens.remaining == 400
    second = await limiter.reserve(quota, Ask(600, 0.0), "local")
    assert second.refusal == "tokens"
    assert second.retry_after_s is not None
    too_big = await limiter.reserve(quota, Ask(1001, 0.0), "local")
    assert too_big.refusal == "too_large"
    assert too_big.retry_after_s is None
    limiter.settle(first.ticket, 150, 0.0)  # the answer used 150 of the 600 reserved
    await limiter.drain()
    third = await limiter.reserve(quota, Ask(600, 0.0), "local")
    assert third.allowed
    assert third.tokens is not None
    assert third.tokens.remaining == 250


async def test_budget_reserved_settled_and_spent(redis: Redis, key_prefix: str) -> None:
    limiter = Limiter(redis, key_prefix, replicas=1)
    quota = Quota(_key(), budget_usd=0.01, period="day")
    first = await limiter.reserve(quota, Ask(0, 0.008), "local")
    assert first.allowed
    assert first.ticket is not None
    assert (await limiter.reserve(quota, Ask(0, 0.001), "local")).allowed  # 0.008 < 0.01
    assert (await limiter.reserve(quota, Ask(0, 0.001), "local")).allowed  # 0.009 < 0.01
    spent = await limiter.reserve(quota, Ask(0, 0.001), "local")
    assert spent.refusal == "budget"
    assert spent.retry_after_s is not None
    assert 0 < spent.retry_after_s <= 86_400
    limiter.settle(first.ticket, 0, 0.002)  # it cost 0.002, not the 0.008 reserved
    await limiter.drain()
    assert (await limiter.reserve(quota, Ask(0, 0.001), "local")).allowed
    ttl = await redis.ttl(f"{key_prefix}rl:{{{quota.key_id}}}:usd:" + first.ticket.period_id)  # type: ignore[operator]
    assert 86_400 < ttl <= 2 * 86_400  # the day's counter outlives the day by a day


async def test_zero_budget_and_absurd_asks(redis: Redis, key_prefix: str) -> None:
    limiter = Limiter(redis, key_prefix, replicas=1)
    nothing = await limiter.reserve(Quota(_key(), budget_usd=0.0), Ask(1, 0.0), "local")
    assert nothing.refusal == "budget"  # a $0 budget admits nothing
    # A client's max_tokens and n can ask for anything: capped, never a Redis error (which
    # would read as an outage) nor a spend Redis cannot count.
    quota = Quota(_key(), rpm=5, tpm=10**13, budget_usd=200_000.0)
    huge = await limiter.reserve(quota, Ask(10**20, 10**12), "local")
    assert huge.allowed
    assert limiter.degraded.total() == 0
    assert limiter.redis_up
    spent = await limiter.reserve(quota, Ask(1, 0.0), "local")
    assert spent.refusal == "budget"  # the reservation took the whole (capped) budget


async def test_outage_local_share_or_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    client = Redis.from_url(own.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    limiter = Limiter(client, "t:", replicas=4)
    quota = Quota(_key(), rpm=20)
    try:
        assert (await limiter.reserve(quota, Ask(0, 0.0), "local")).allowed
        own.stop()
        caplog.set_level(logging.WARNING, "flywheel.limits")
        local = [await limiter.reserve(quota, Ask(0, 0.0), "local") for _ in range(8)]
        assert [d.allowed for d in local] == [True] * 5 + [False] * 3  # 20 // 4 here
        assert local[0].requests is not None
        assert local[0].requests.limit == 5
        closed = await limiter.reserve(quota, Ask(0, 0.0), "closed")
        assert closed.refusal == "unavailable"
        assert closed.retry_after_s == 1.0
        assert limiter.degraded == {"local": 8, "closed": 1}
        assert not limiter.redis_up
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1  # once per outage, not per request
        own.start()
        await asyncio.sleep(1.1)  # the retry interval
        back = await limiter.reserve(quota, Ask(0, 0.0), "local")
        assert back.allowed
        assert limiter.redis_up
        assert back.requests is not None
        assert back.requests.limit == 20
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()
        own.stop()
