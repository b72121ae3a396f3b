"""The cycle's buckets from real `requests` rows: counts, sums, the latency histogram
and the bucket placement agree with the rows, on whichever database the suite runs.

Rows live on a day of the test's own in 2004 under a route of its own, deleted after.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cycle.evidence import latency_bin, summarize
from app.store.cycle_evidence import ArmKey, by_deployment, by_route, by_variant, load_buckets
from app.store.schema import RequestRow

BUCKET_S = 300


@pytest.fixture
async def route(engine: AsyncEngine) -> AsyncIterator[str]:
    name = f"ev-{uuid.uuid4().hex[:8]}"
    yield name
    async with engine.begin() as conn:
        await conn.execute(delete(RequestRow).where(RequestRow.route == name))


def _row(route: str, at: datetime, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created_at": at,
        "endpoint": "chat.completions",
        "route": route,
        "deployment": "d1",
        "status": 200,
        "latency_ms": 120.0,
        "cost": 0.001,
        "cache_tier": "miss",
        "quality_score": 1.0,
        "variant": None,
    }
    # Every row has every key: an executemany takes its columns from the first row.
    assert set(over) <= set(row)
    return row | over


async def test_buckets_add_up_per_arm_and_bucket(engine: AsyncEngine, route: str) -> None:
    day = datetime(2004, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 300)
    t0 = day + timedelta(hours=10)  # aligned to the 5-minute buckets
    rows = [
        _row(route, t0 + timedelta(seconds=10), latency_ms=40.0, quality_score=0.5),
        _row(route, t0 + timedelta(seconds=20), latency_ms=900.0, quality_score=1.0),
        _row(route, t0 + timedelta(seconds=30), status=502, quality_score=0.0),
        _row(route, t0 + timedelta(seconds=40), quality_score=None),  # unscored
        _row(route, t0 + timedelta(seconds=50), status=400),  # the client's fault
        _row(route, t0 + timedelta(minutes=6), deployment="d2", cost=0.01),
        _row(route, t0 + timedelta(minutes=7), variant="var_x", quality_score=0.2),
        # Not evidence: a cache hit, an embedding, a refused request, outside the range.
        _row(route, t0 + timedelta(seconds=5), cache_tier="hit-l2"),
        _row(route, t0 + timedelta(seconds=6), endpoint="embeddings"),
        _row(route, t0 + timedelta(seconds=7), deployment=None, status=429),
        _row(route, t0 - timedelta(hours=2)),
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(RequestRow), rows)
    arms = await load_buckets(engine, t0 - timedelta(minutes=30), t0 + timedelta(hours=1), BUCKET_S)
    arms = {k: v for k, v in arms.items() if k.route == route}
    assert set(arms) == {
        ArmKey(route, "d1", None),
        ArmKey(route, "d2", None),
        ArmKey(route, "d1", "var_x"),
    }
    [b] = arms[ArmKey(route, "d1", None)]
    assert b.start == t0.timestamp()
    assert (b.requests, b.errors, b.scored) == (5, 1, 4)
    assert math.isclose(b.q_sum, 0.5 + 1.0 + 0.0 + 1.0)
    assert math.isclose(b.q_sq, 0.25 + 1.0 + 0.0 + 1.0)
    assert math.isclose(b.cost_sum, 0.005)
    assert b.latency_hist[latency_bin(40.0)] == 1
    assert b.latency_hist[latency_bin(900.0)] == 1
    assert b.latency_hist[latency_bin(120.0)] == 3
    assert sum(b.latency_hist) == 5
    [b2] = arms[ArmKey(route, "d2", None)]
    assert b2.start == t0.timestamp() + BUCKET_S
    deployments = by_deployment(arms, route)
    assert sorted(deployments) == ["d1", "d2"]
    assert [x.requests for x in deployments["d1"]] == [5, 1]  # the variant's row joins d1
    variants = by_variant(arms, route)
    assert sorted(variants) == ["baseline", "var_x"]
    [whole] = [by_route(arms)[route]]
    assert sum(x.requests for x in whole) == 7
    s = summarize(whole, t0.timestamp() + 3600, math.inf)
    assert s.count == 7
    assert s.quality is not None
    assert math.isclose(s.quality, (2.5 + 1.0 + 0.2) / 6)
    assert math.isclose(s.error_rate, 1 / 7)
