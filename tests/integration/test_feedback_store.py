"""Feedback through the request stream into the database: stored, replaced only by the
tenant that gave it, and forwarded only when it names a request of that tenant."""

from __future__ import annotations

import time
import uuid

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.consolidation import stream_key
from app.store.records import FeedbackRecord, Recorder
from app.store.schema import Feedback
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
