"""The global bound on batch lines, against the real Redis: never exceeded by workers
racing for it, slots of a crashed worker freed when their hold lapses, renewed holds
kept, and a local bound while Redis is down."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest
from redis.asyncio import Redis

from app.store.batch_slots import LOCAL, GlobalSlots, slots_key
from tests.integration.test_live_queue import closed_port


def down_redis() -> Redis:
    """A client of a port where no Redis listens."""
    client: Redis = Redis.from_url(
        f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=0.25, socket_connect_timeout=0.25
    )
    return client


async def test_the_limit_holds_across_instances(redis_url: str, own_prefix: str) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    workers = [GlobalSlots(c, own_prefix, limit=5, hold_s=30) for c in clients]
    holding = peak = 0
    seen_in_redis: list[int] = []

    async def line(i: int) -> None:
        nonlocal holding, peak
        slots = workers[i % 2]
        token = await asyncio.wait_for(slots.acquire(), 20)
        assert token is not None
        assert not token.startswith(LOCAL)
        holding += 1
        peak = max(peak, holding)
        seen_in_redis.append(await clients[0].zcard(slots_key(own_prefix)))
        await asyncio.sleep(random.uniform(0.005, 0.03))
        holding -= 1
        await slots.release(token)

    await asyncio.gather(*(line(i) for i in range(50)))
    assert peak == 5  # the bound was reached, and never passed
    assert max(seen_in_redis) <= 5
    assert await clients[0].zcard(slots_key(own_prefix)) == 0
    assert all(not w.held for w in workers)
    for c in clients:
        await c.aclose()


async def test_a_crashed_workers_slots_free_themselves(redis: Redis, own_prefix: str) -> None:
    crashed = GlobalSlots(redis, own_prefix, limit=2, hold_s=0.4)
    assert await crashed.acquire() is not None
    assert await crashed.acquire() is not None  # and never released

    other = GlobalSlots(redis, own_prefix, limit=2, hold_s=30)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    assert await other.acquire(stop) is None  # full, until stopped
    started = time.monotonic()
    token = await asyncio.wait_for(other.acquire(), 3)
    assert token is not None
    assert time.monotonic() - started < 0.8  # soon after the 0.4 s hold lapsed
    assert await redis.zcard(slots_key(own_prefix)) == 1  # both lapsed holders went
    assert await redis.pttl(slots_key(own_prefix)) > 20_000  # the longer hold keeps the key


async def test_renewed_slots_are_kept(redis: Redis, own_prefix: str) -> None:
    long_line = GlobalSlots(redis, own_prefix, limit=1, hold_s=0.3)
    token = await long_line.acquire()
    assert token is not None
    renewing = asyncio.create_task(long_line.renew_forever(0.1))
    other = GlobalSlots(redis, own_prefix, limit=1, hold_s=0.3)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.7, stop.set)
    assert await other.acquire(stop) is None  # held past its hold, renewed
    renewing.cancel()
    assert await long_line.renew([token]) == 1
    await asyncio.sleep(0.4)
    assert await long_line.renew([token]) == 0  # lapsed: not taken back
    assert await asyncio.wait_for(other.acquire(), 1) is not None


async def test_redis_down_falls_back_to_a_local_bound(
    own_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = down_redis()
    slots = GlobalSlots(down, own_prefix, limit=2, hold_s=30)
    with caplog.at_level(logging.WARNING, logger="flywheel.batches"):
        first = await asyncio.wait_for(slots.acquire(), 2)
        second = await asyncio.wait_for(slots.acquire(), 2)
        assert first is not None
        assert second is not None
        assert first.startswith(LOCAL)
        assert second.startswith(LOCAL)
        third = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.2)
        assert not third.done()  # the local bound holds
        await slots.release(first)
        token = await asyncio.wait_for(third, 2)
        assert token is not None
        assert token.startswith(LOCAL)
        assert await slots.renew() == 0  # nothing to renew locally
        stop = asyncio.Event()
        stop.set()
        assert await slots.acquire(stop) is None
    warnings = [r for r in caplog.records if "batch slots not reachable" in r.message]
    assert len(warnings) == 1
    await down.aclose()


async def test_slots_come_back_to_redis_after_an_outage(
    redis: Redis, own_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.store.batch_slots.RETRY_REDIS_AFTER_S", 0.1)
    slots = GlobalSlots(redis, own_prefix, limit=3, hold_s=30)
    real = slots._acquire

    async def failing(**kwargs: object) -> object:
        raise ConnectionError("redis went away")

    slots._acquire = failing  # type: ignore[assignment]
    local = await slots.acquire()
    assert local is not None
    assert local.startswith(LOCAL)
    slots._acquire = real
    await asyncio.sleep(0.15)
    token = await slots.acquire()
    assert token is not None
    assert not token.startswith(LOCAL)
    assert slots.held == {token}
    await slots.release(local)
    await slots.release(token)
    assert await redis.zcard(slots_key(own_prefix)) == 0
