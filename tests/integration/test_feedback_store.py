"""Feedback through the request stream into the database: stored, replaced only by the
tenant that gave it, and forwarded only when it names a request of that tenant."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.consolidation import stream_key
from app.store.owners import Owners, digest
from app.store.quality import set_judge_score
from app.store.records import FeedbackRecord, Recorder, RequestRecord
from app.store.schema import Feedback, RequestRow
from tests.integration.test_consolidation import consolidator, drain, record


@pytest.fixture
def prefix(key_prefix: str) -> str:
    return f"{key_prefix}fb{uuid.uuid4().hex[:6]}:"


def feedback(rid: str, score: float, tenant: str, comment: str | None = None) -> FeedbackRecord:
    return FeedbackRecord(rid, score, tenant, time.time(), comment)


async def stored(engine: AsyncEngine, rid: str) -> dict[str, tuple[float, str | None]]:
    """The request's scores by tenant."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(Feedback.tenant, Feedback.score, Feedback.comment).where(
                Feedback.request_id == rid
            )
        )
        return {tenant: (score, comment) for tenant, score, comment in rows.all()}


async def test_feedback_is_stored_replaced_by_its_tenant_and_forwarded(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    mine, other = f"chatcmpl-{uuid.uuid4().hex}", f"chatcmpl-{uuid.uuid4().hex}"
    recorder = Recorder(redis, stream_key(prefix))
    recorder.record(record(mine))  # tenant t1
    recorder.record(record(other))
    recorder.ship(feedback(mine, 0.25, "t1", "wrong, mail me at jane@example.org"))
    recorder.ship(feedback(other, 0.9, "t2"))  # someone else's request
    assert await recorder.flush()
    forwarded: list[tuple[str, float, str | None]] = []
    c = consolidator(redis, engine, prefix, "w1", block_s=0.05)
    c.on_feedback = lambda rid, score, comment, _started: forwarded.append((rid, score, comment))
    await c.ensure_group()
    assert await drain(c) == 4
    # Masked before it left the gateway process, as everything stored is.
    assert await stored(engine, mine) == {"t1": (0.25, "wrong, mail me at [EMAIL]")}
    assert forwarded == [(mine, 0.25, "wrong, mail me at [EMAIL]")]  # not t2's on t1's request

    recorder.ship(feedback(mine, 1.0, "t1"))  # the same caller changes its mind
    recorder.ship(feedback(other, 0.0, "t1"))  # t2's score got first; t1's is not blocked
    assert await recorder.flush()
    forwarded.clear()
    assert await drain(c) == 2
    assert await stored(engine, mine) == {"t1": (1.0, None)}
    assert await stored(engine, other) == {"t1": (0.0, None), "t2": (0.9, None)}
    # t2's score on `other` is not this batch's: not sent again.
    assert sorted(forwarded) == sorted([(mine, 1.0, None), (other, 0.0, None)])

    # A score given earlier but delivered later (another replica, an outage's buffer)
    # does not replace the newer one.
    late = FeedbackRecord(mine, 0.1, "t1", time.time() - 60)
    recorder.ship(late)
    assert await recorder.flush()
    assert await drain(c) == 1
    assert await stored(engine, mine) == {"t1": (1.0, None)}


async def test_bad_feedback_is_set_aside_not_retried(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    recorder = Recorder(redis, stream_key(prefix))
    good = f"chatcmpl-{uuid.uuid4().hex}"
    recorder.ship(feedback(good, 0.5, "t1"))
    recorder.ship(FeedbackRecord(f"chatcmpl-{uuid.uuid4().hex}", 7.0, "t1", time.time()))
    assert await recorder.flush()
    c = consolidator(redis, engine, prefix, "w1", block_s=0.05)
    await c.ensure_group()
    assert await drain(c) == 1
    assert await stored(engine, good) == {"t1": (0.5, None)}
    assert await redis.xlen(prefix + "requests:dead") == 1
    await redis.delete(prefix + "requests:dead", stream_key(prefix))


async def quality_of(engine: AsyncEngine, rid: str) -> tuple[float | None, str | None, Any]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    RequestRow.quality_score, RequestRow.quality_source, RequestRow.quality_reasons
                ).where(RequestRow.id == rid)
            )
        ).one()
        return row[0], row[1], row[2]


def judged(rid: str, score: float | None, reasons: list[str] | None, **extra: Any) -> RequestRecord:
    return record(rid, quality=score, quality_reasons=reasons, **extra)


async def ship_and_drain(
    redis: Redis, engine: AsyncEngine, prefix: str, items: list[Any], expected: int
) -> None:
    recorder = Recorder(redis, stream_key(prefix))
    for item in items:
        if isinstance(item, RequestRecord):
            recorder.record(item)
        else:
            recorder.ship(item)
    assert await recorder.flush()
    c = consolidator(redis, engine, prefix, "w1", block_s=0.05)
    await c.ensure_group()
    assert await drain(c) == expected


async def test_rows_carry_the_rules_quality_and_feedback_overrides_it(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    rid, clean, unjudged = (f"chatcmpl-{uuid.uuid4().hex}" for _ in range(3))
    await ship_and_drain(
        redis,
        engine,
        prefix,
        [
            judged(rid, 0.3, ["truncated", "slow"]),
            judged(clean, 1.0, []),
            judged(unjudged, None, None, status=429),
        ],
        3,
    )
    assert await quality_of(engine, rid) == (0.3, "rules", ["truncated", "slow"])
    assert await quality_of(engine, clean) == (1.0, "rules", [])
    assert await quality_of(engine, unjudged) == (None, None, None)

    # Another tenant's score changes nothing; the owner's replaces the rules'.
    await ship_and_drain(redis, engine, prefix, [feedback(rid, 0.0, "t2")], 1)
    assert await quality_of(engine, rid) == (0.3, "rules", ["truncated", "slow"])
    await ship_and_drain(redis, engine, prefix, [feedback(rid, 0.9, "t1")], 1)
    assert await quality_of(engine, rid) == (0.9, "feedback", ["feedback"])

    # Repeated feedback updates the one row (the newest wins), never adds one.
    await ship_and_drain(redis, engine, prefix, [feedback(rid, 0.2, "t1")], 1)
    assert await quality_of(engine, rid) == (0.2, "feedback", ["feedback"])
    assert await stored(engine, rid) == {"t1": (0.2, None), "t2": (0.0, None)}
    late = FeedbackRecord(rid, 1.0, "t1", time.time() - 60)  # given before, delivered after
    await ship_and_drain(redis, engine, prefix, [late], 1)
    assert await quality_of(engine, rid) == (0.2, "feedback", ["feedback"])

    # The master key may score anyone's request; the newest owned score wins.
    await ship_and_drain(redis, engine, prefix, [feedback(rid, 0.6, "master")], 1)
    assert await quality_of(engine, rid) == (0.6, "feedback", ["feedback"])


async def test_feedback_that_arrives_first_wins_when_its_request_lands(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    early, same_batch, foreign = (f"chatcmpl-{uuid.uuid4().hex}" for _ in range(3))
    # Feedback consolidated before its request (another replica's buffer was slower).
    await ship_and_drain(
        redis, engine, prefix, [feedback(early, 0.8, "t1"), feedback(foreign, 0.0, "t9")], 2
    )
    await ship_and_drain(
        redis,
        engine,
        prefix,
        [
            judged(early, 0.1, ["invalid_json"]),
            judged(foreign, 1.0, []),
            # In one batch, feedback ahead of the record it names.
            feedback(same_batch, 0.0, "t1"),
            judged(same_batch, 1.0, []),
        ],
        4,
    )
    assert await quality_of(engine, early) == (0.8, "feedback", ["feedback"])
    assert await quality_of(engine, same_batch) == (0.0, "feedback", ["feedback"])
    assert await quality_of(engine, foreign) == (1.0, "rules", [])  # t9 does not own it
    # A replayed record changes nothing: the row stays as feedback made it.
    await ship_and_drain(redis, engine, prefix, [judged(early, 0.1, ["invalid_json"])], 1)
    assert await quality_of(engine, early) == (0.8, "feedback", ["feedback"])


async def test_a_judge_score_never_overrides_feedback(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    ruled, scored = f"chatcmpl-{uuid.uuid4().hex}", f"chatcmpl-{uuid.uuid4().hex}"
    await ship_and_drain(
        redis,
        engine,
        prefix,
        [judged(ruled, 1.0, []), judged(scored, 1.0, []), feedback(scored, 0.3, "t1")],
        3,
    )
    assert await set_judge_score(engine, ruled, 0.4, ["judge: vague"])
    assert await quality_of(engine, ruled) == (0.4, "judge", ["judge: vague"])
    assert not await set_judge_score(engine, scored, 0.9, ["judge: fine"])
    assert await quality_of(engine, scored) == (0.3, "feedback", ["feedback"])
    assert not await set_judge_score(engine, f"chatcmpl-{uuid.uuid4().hex}", 0.5, [])
    # Feedback after the judge replaces the judge's score.
    await ship_and_drain(redis, engine, prefix, [feedback(ruled, 1.0, "t1")], 1)
    assert await quality_of(engine, ruled) == (1.0, "feedback", ["feedback"])
    with pytest.raises(ValueError, match="judge"):
        await set_judge_score(engine, ruled, 1.5, [])


async def test_malformed_quality_from_a_gateway_is_dropped_not_the_row(
    redis: Redis, engine: AsyncEngine, prefix: str
) -> None:
    rid, other = f"chatcmpl-{uuid.uuid4().hex}", f"chatcmpl-{uuid.uuid4().hex}"
    await ship_and_drain(
        redis,
        engine,
        prefix,
        [judged(rid, 7.0, ["x"]), judged(other, 0.5, "not a list")],  # type: ignore[arg-type]
        2,
    )
    assert await quality_of(engine, rid) == (None, None, None)
    assert await quality_of(engine, other) == (0.5, "rules", None)


async def test_the_owner_index_is_bounded_in_time_and_size(redis: Redis, prefix: str) -> None:
    owners = Owners(f"{prefix}owners:", ttl_s=40.0, capacity=2)
    ids = [f"chatcmpl-{uuid.uuid4().hex[:24]}", "req-client-chosen-id"]
    pipe = redis.pipeline(transaction=False)
    owners.add_to(pipe, [(ids[0], "key:a"), (ids[1], "key:b")])
    await pipe.execute()
    assert await owners.in_redis(redis, ids[0]) == digest("key:a")
    assert await owners.in_redis(redis, ids[1]) == digest("key:b")
    assert await owners.in_redis(redis, f"chatcmpl-{uuid.uuid4().hex[:24]}") is None
    keys = [k async for k in redis.scan_iter(match=f"{prefix}owners:*")]
    assert len(keys) == 1  # one hash per time bucket, not a key per request
    assert 0 < await redis.ttl(keys[0]) <= 40
    # This process's memory keeps the newest ids only.
    for n, rid in enumerate(("a", "b", "c")):
        owners.remember(rid, f"t{n}")
    assert (owners.local("a"), owners.local("b"), owners.local("c")) == (None, "t1", "t2")
    await redis.delete(*keys)
