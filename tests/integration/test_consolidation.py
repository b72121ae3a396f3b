"""Consolidation against the real Redis and database: once per request, whatever happens."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.consolidation import (
    GROUP,
    Consolidator,
    ConsolidatorConfig,
    consolidation_status,
    late_key,
    stream_key,
)
from app.store.db import make_engine
from app.store.records import Recorder, RequestRecord
from app.store.schema import RequestBody, RequestRow
from tests.integration.test_store_and_worker import record as base_record


@pytest.fixture
def prefix(key_prefix: str) -> str:
    # Its own stream per test: request ids below are unique per test too.
    return f"{key_prefix}cons{uuid.uuid4().hex[:6]}:"


def record(rid: str, **extra: Any) -> RequestRecord:
    return dataclasses.replace(
        base_record(rid), prompt_tokens=3, completion_tokens=4, cache="miss", tenant="t1", **extra
    )


async def ship(redis: Redis, prefix: str, records: list[RequestRecord]) -> None:
    recorder = Recorder(redis, stream_key(prefix))
    for rec in records:
        recorder.record(rec)
    assert await recorder.flush()


def consolidator(
    redis: Redis, engine: AsyncEngine, prefix: str, name: str, **kw: Any
) -> Consolidator:
    return Consolidator(redis, engine, ConsolidatorConfig(prefix=prefix, consumer=name, **kw))


async def count_rows(engine: AsyncEngine, ids: list[str]) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(RequestRow).where(RequestRow.id.in_(ids))
        return int((await conn.execute(query)).scalar_one())


async def drain(c: Consolidator) -> int:
    total = 0
    while (n := await c.step()) != 0:
        assert n > 0, "a step had to wait"
        total += n
    return total


async def test_records_land_once_even_when_shipped_twice(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(30)]
    await ship(redis, prefix, [record(i) for i in ids])
    c = consolidator(redis, engine, prefix, "w1", block_s=0.05)
    await c.ensure_group()
    assert await drain(c) == 30
    await ship(redis, prefix, [record(i) for i in ids[:10]])  # a replayed batch
    await ship(redis, prefix, [record(i) for i in ids[:10]])  # and twice in one batch
    assert await drain(c) == 10
    assert await count_rows(engine, ids) == 30
    async with engine.connect() as conn:
        query = select(RequestRow).where(RequestRow.id == ids[0])
        row = (await conn.execute(query)).mappings().one()
    assert (row["route"], row["cache_tier"], row["tenant"], row["prompt_tokens"]) == (
        "r",
        "miss",
        "t1",
        3,
    )
    status = await consolidation_status(redis, prefix)
    assert status["queue_length"] == 0  # consolidated entries leave the stream
    assert status["pending"] == 0
    assert status["processed"] == 40  # records handled, duplicates within a batch once
    await redis.delete(stream_key(prefix), prefix + "consolidation")


async def test_a_batch_left_by_a_dead_worker_is_claimed(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(20)]
    for chunk in range(4):
        await ship(redis, prefix, [record(i) for i in ids[chunk * 5 : chunk * 5 + 5]])
    dead = consolidator(redis, engine, prefix, "dead", batch_size=2)
    await dead.ensure_group()
    # It reads two entries and "dies" before writing them (no ack).
    taken = await redis.xreadgroup(GROUP, "dead", {stream_key(prefix): ">"}, count=2)
    assert len(taken[0][1]) == 2
    status = await consolidation_status(redis, prefix)
    assert (status["queue_length"], status["pending"]) == (4, 2)
    alive = consolidator(redis, engine, prefix, "alive", claim_idle_s=0.2, block_s=0.05)
    assert await drain(alive) == 10  # the two entries nobody held
    assert await count_rows(engine, ids) == 10
    time.sleep(0.25)
    alive._next_claim = 0.0  # its next claim is due now, not in claim_idle_s / 2
    assert await drain(alive) == 10
    assert await count_rows(engine, ids) == 20
    assert (await consolidation_status(redis, prefix))["pending"] == 0
    await redis.delete(stream_key(prefix), prefix + "consolidation")


async def test_database_outage_keeps_records_until_it_returns(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(12)]
    await ship(redis, prefix, [record(i) for i in ids])
    down = make_engine("postgresql+asyncpg://127.0.0.1:1/none")
    c = consolidator(redis, down, prefix, "w", block_s=0.05)
    await c.ensure_group()
    started = time.perf_counter()
    assert await c.step() == -1
    assert time.perf_counter() - started < 6  # refused fast, never a hang
    status = await consolidation_status(redis, prefix)
    assert (status["queue_length"], status["pending"]) == (1, 1)
    await down.dispose()
    c.engine = engine  # the database is back
    assert await drain(c) == 12
    assert await count_rows(engine, ids) == 12
    assert (await consolidation_status(redis, prefix))["queue_length"] == 0
    await redis.delete(stream_key(prefix), prefix + "consolidation")


async def test_bodies_are_redacted_and_expire_on_their_own(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    bodies = {
        "request": {
            "messages": [
                {"role": "user", "content": "mail jane@example.org, card 4111 1111 1111 1111"}
            ]
        },
        "response": {"choices": [{"message": {"content": "call +44 20 7946 0958"}}]},
        "retention_s": 3600.0,
    }
    recorder = Recorder(redis, stream_key(prefix))
    recorder.start()
    recorder.record(record(rid, bodies=bodies))
    await recorder.stop()
    raw = await redis.xrange(stream_key(prefix))
    assert b"jane@example.org" not in raw[0][1][b"records"]  # redacted before Redis
    c = consolidator(redis, engine, prefix, "w", block_s=0.05)
    await c.ensure_group()
    assert await drain(c) == 1
    async with engine.connect() as conn:
        query = select(RequestBody).where(RequestBody.request_id == rid)
        body = (await conn.execute(query)).one()
    assert body.request is not None
    assert body.response is not None
    request = orjson.loads(body.request)
    assert request["messages"][0]["content"] == "mail [EMAIL], card [CARD]"
    assert orjson.loads(body.response)["choices"][0]["message"]["content"] == "call [PHONE]"
    lifetime = body.expires_at - body.created_at
    assert lifetime.total_seconds() == pytest.approx(3600, abs=1)
    await redis.delete(stream_key(prefix), prefix + "consolidation")


async def test_redis_losing_the_group_does_not_stop_consolidation(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    c = consolidator(redis, engine, prefix, "w", block_s=0.05)
    await c.ensure_group()
    await redis.delete(stream_key(prefix))  # Redis restarted empty, say
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(5)]
    await ship(redis, prefix, [record(i) for i in ids])  # a new stream, no group
    assert await c.step() == 0  # notices, makes the group again
    assert await drain(c) == 5
    assert await count_rows(engine, ids) == 5
    await redis.delete(stream_key(prefix), prefix + "consolidation")


async def test_bad_records_are_set_aside_alone(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    good = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(4)]
    nul = f"chatcmpl-{uuid.uuid4().hex}"
    await ship(redis, prefix, [record(i) for i in good] + [record(nul, variant="a\x00b")])
    # A record with no time and a non-record, from a foreign or broken writer.
    await redis.xadd(stream_key(prefix), {"records": orjson.dumps([{"request_id": "x"}, 7])})
    await redis.xadd(stream_key(prefix), {"records": b"not json"})
    c = consolidator(redis, engine, prefix, "w", block_s=0.05)
    await c.ensure_group()
    await drain(c)
    assert await count_rows(engine, [*good, nul]) == 5  # NUL stripped, not a refusal
    dead = await redis.xrange(prefix + "requests:dead")
    assert len(dead) == 3
    kept = [f[b"record"] for _, f in dead]
    assert b"not json" in kept  # kept whole, as it came
    assert b"7" in kept
    assert orjson.dumps({"request_id": "x"}) in kept
    status = await consolidation_status(redis, prefix)
    assert (status["queue_length"], status["pending"], status["dead_letters"]) == (0, 0, 3)
    await redis.delete(stream_key(prefix), prefix + "consolidation", prefix + "requests:dead")


async def test_entries_trimmed_while_pending_are_counted(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    await ship(redis, prefix, [record(f"chatcmpl-{uuid.uuid4().hex}")])
    c = consolidator(redis, engine, prefix, "w", block_s=0.05)
    await c.ensure_group()
    taken = await redis.xreadgroup(GROUP, "w", {stream_key(prefix): ">"}, count=1)
    await redis.xdel(stream_key(prefix), taken[0][1][0][0])  # what MAXLEN trimming does
    assert await drain(c) == 0
    status = await consolidation_status(redis, prefix)
    assert (status["trimmed"], status["pending"]) == (1, 0)
    await redis.delete(stream_key(prefix), prefix + "consolidation")


async def test_consolidation_marks_the_oldest_request_it_wrote(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    old = record(f"chatcmpl-{uuid.uuid4().hex}")
    old.started_at -= 3600  # held in a gateway through an outage
    await ship(redis, prefix, [old, record(f"chatcmpl-{uuid.uuid4().hex}")])
    c = consolidator(redis, engine, prefix, "w", block_s=0.05)
    await c.ensure_group()
    assert await drain(c) == 2
    marked = await redis.zscore(late_key(prefix), "oldest")
    assert marked == pytest.approx(old.started_at, abs=0.001)
    await redis.delete(stream_key(prefix), prefix + "consolidation", late_key(prefix))
