"""Metrics history on the real database: aggregation, re-runs, catch-up and pruning.

Rows are inserted directly, in buckets of their own far from today (other tests write
rows "now" to the same database), and deleted afterwards with the points they made.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq import Retry
from redis.asyncio import Redis
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store import metrics_history
from app.store.consolidation import late_key
from app.store.jobs import read_jobs
from app.store.metrics_history import ALL, NONE, persist, prune_points
from app.store.metrics_read import read_history
from app.store.schema import MetricsPoint, RequestRow
from workers.context import shutdown, startup
from workers.tasks.metrics import persist_metrics

I = 300  # noqa: E741 - the interval, in seconds
HISTORY = 288


@pytest.fixture
async def t0(engine: AsyncEngine) -> AsyncIterator[datetime]:
    """A bucket start of this test's own (a random day in 2001), cleaned up afterwards."""
    day = datetime(2001, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 300)
    yield day
    lo, hi = day - timedelta(days=2), day + timedelta(days=2)
    async with engine.begin() as conn:
        await conn.execute(
            delete(RequestRow).where(RequestRow.created_at >= lo, RequestRow.created_at < hi)
        )
        await conn.execute(
            delete(MetricsPoint).where(
                MetricsPoint.bucket_start >= lo, MetricsPoint.bucket_start < hi
            )
        )


def row(
    at: datetime, route: str | None = "r1", deployment: str | None = "d1", **kw: Any
) -> dict[str, Any]:
    return {
        "id": f"t-{uuid.uuid4().hex}",
        "created_at": at,
        "endpoint": "chat.completions",
        "route": route,
        "deployment": deployment,
        "status": 200,
        "latency_ms": 10.0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost": 0.0,
        "cache_tier": "bypass",
        # executemany needs every row to name the same columns
        "stream": False,
        "ttft_ms": None,
        "error_type": None,
        "quality_score": None,
        **kw,
    }


async def add(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(RequestRow), rows)


async def points(engine: AsyncEngine, start: datetime) -> dict[tuple[str, str], MetricsPoint]:
    async with engine.connect() as conn:
        found = await conn.execute(select(MetricsPoint).where(MetricsPoint.bucket_start == start))
        return {(p.route, p.deployment): p for p in found}


async def run(engine: AsyncEngine, now: datetime, history: int = HISTORY) -> dict[str, Any]:
    return await persist(engine, now=now, interval_s=I, history_points=history)


async def test_a_bucket_is_aggregated_per_series_and_in_total(
    engine: AsyncEngine, t0: datetime
) -> None:
    at = t0 + timedelta(seconds=5)
    rows = [  # r1/d1: latencies 1..100 ms, streamed (TTFT 101..200), every tier once+
        row(
            at,
            latency_ms=float(v),
            ttft_ms=float(100 + v),
            stream=True,
            prompt_tokens=10,
            completion_tokens=5,
            cost=0.001,
            cache_tier=("hit-l1", "hit-l2", "miss", "bypass")[v % 4],
            quality_score=1.0 if v <= 50 else None,
        )
        for v in range(1, 101)
    ]
    rows += [
        row(at, deployment="d2", status=429, error_type="rate_limit_error", latency_ms=5.0),
        row(at, deployment="d2", status=502, error_type="upstream_error", latency_ms=7.0),
        row(at, deployment="d2", status=200, latency_ms=3.0, quality_score=0.5),
        row(at, route=None, deployment=None, status=404, latency_ms=0.5),
    ]
    rows.append(row(t0 + timedelta(seconds=I), latency_ms=1e6))  # the next bucket's
    await add(engine, rows)
    done = await run(engine, t0 + timedelta(seconds=I - 1))
    assert done["requests"] == 104
    got = await points(engine, t0)
    assert set(got) == {("r1", "d1"), ("r1", "d2"), (NONE, NONE), (ALL, ALL)}
    d1, d2, total = got["r1", "d1"], got["r1", "d2"], got[ALL, ALL]
    assert (d1.requests, d1.errors, d1.bucket_s) == (100, 0, I)
    assert (d1.latency_p50_ms, d1.latency_p95_ms, d1.latency_p99_ms) == (50.0, 95.0, 99.0)
    assert (d1.ttft_p50_ms, d1.ttft_p95_ms) == (150.0, 195.0)
    assert (d1.prompt_tokens, d1.completion_tokens) == (1000, 500)
    assert d1.cost == pytest.approx(0.1)
    assert (d1.cache_hits_l1, d1.cache_hits_l2, d1.cache_misses) == (25, 25, 25)
    assert (d1.quality_mean, d1.quality_count) == (1.0, 50)
    assert (d2.requests, d2.errors) == (3, 2)
    assert d2.errors_by_class == {"4xx": 1, "5xx": 1, "rate_limit_error": 1, "upstream_error": 1}
    assert (d2.latency_p50_ms, d2.ttft_p50_ms) == (5.0, None)
    assert got[NONE, NONE].errors_by_class == {"4xx": 1}
    assert (total.requests, total.errors) == (104, 3)
    assert total.errors_by_class == {"4xx": 2, "5xx": 1, "rate_limit_error": 1, "upstream_error": 1}
    # All traffic's percentiles are over all 104 latencies, not a mean of the series'.
    assert (total.latency_p50_ms, total.latency_p95_ms, total.latency_p99_ms) == (48.0, 95.0, 99.0)
    assert total.ttft_p95_ms == 195.0
    assert total.quality_mean == pytest.approx(50.5 / 51)
    history = await read_history(engine, hours=1, now=t0 + timedelta(seconds=I - 1))
    assert [p["requests"] for p in history["totals"]] == [0, 104]  # 1 h back: two buckets
    point = history["totals"][-1]
    assert point["cache"]["hit_rate"] == {"l1": 0.3333, "l2": 0.5, "any": 0.6667}
    assert point["error_rate"] == round(3 / 104, 4)
    series = {(s["route"], s["deployment"]): s["points"] for s in history["series"]}
    assert series["r1", "d1"][-1]["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}


async def test_a_rerun_replaces_its_points_and_takes_late_rows(
    engine: AsyncEngine, t0: datetime
) -> None:
    await add(engine, [row(t0 + timedelta(seconds=s)) for s in (1, 2, 3)])
    now = t0 + timedelta(seconds=100)
    await run(engine, now)
    await run(engine, now)
    async with engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(MetricsPoint).where(MetricsPoint.bucket_start == t0)
        )
    assert count == 2  # r1/d1 and all traffic, not twice
    # A row consolidated late into the bucket that has since closed: the next run counts it.
    await add(engine, [row(t0 + timedelta(seconds=290))])
    await run(engine, t0 + timedelta(seconds=I + 10))
    got = await points(engine, t0)
    assert got["r1", "d1"].requests == 4
    assert got[ALL, ALL].requests == 4
    assert (await points(engine, t0 + timedelta(seconds=I)))[ALL, ALL].requests == 0


async def test_missed_buckets_are_caught_up_and_old_points_pruned(
    engine: AsyncEngine, t0: datetime
) -> None:
    await add(engine, [row(t0 + timedelta(seconds=1))])
    await run(engine, t0 + timedelta(seconds=10))
    # The job is down for a while; traffic goes on.
    await add(engine, [row(t0 + timedelta(seconds=3 * I + 1)), row(t0 + timedelta(seconds=5 * I))])
    done = await run(engine, t0 + timedelta(seconds=8 * I + 10))
    assert done["buckets"] == 9  # from the last point to the open bucket, none missing
    async with engine.connect() as conn:
        totals = dict(
            (
                await conn.execute(
                    select(MetricsPoint.bucket_start, MetricsPoint.requests).where(
                        MetricsPoint.route == ALL,
                        MetricsPoint.bucket_start >= t0,
                        MetricsPoint.bucket_start < t0 + timedelta(days=1),
                    )
                )
            ).all()
        )
    counts = [v for _, v in sorted(totals.items())]
    assert counts == [1, 0, 0, 1, 0, 1, 0, 0, 0]
    # Keeping 4 points: a run 8 buckets on deletes what is older than the last 4.
    pruned = await prune_points(
        engine, now=t0 + timedelta(seconds=8 * I + 10), interval_s=I, history_points=4
    )
    assert pruned >= 5
    async with engine.connect() as conn:
        left = await conn.scalar(
            select(func.count())
            .select_from(MetricsPoint)
            .where(
                MetricsPoint.route == ALL,
                MetricsPoint.bucket_start >= t0,
                MetricsPoint.bucket_start < t0 + timedelta(days=1),
            )
        )
    assert left == 4


async def test_series_beyond_the_cap_fold_into_other(
    engine: AsyncEngine, t0: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_history, "MAX_SERIES", 2)
    at = t0 + timedelta(seconds=1)
    await add(engine, [row(at, route=f"m{n}") for n in (1, 1, 1, 2, 2, 3, 4)])
    await run(engine, t0 + timedelta(seconds=10))
    got = await points(engine, t0)
    assert {k: p.requests for k, p in got.items()} == {
        ("m1", "d1"): 3,
        ("m2", "d1"): 2,
        (metrics_history.OTHER, metrics_history.OTHER): 2,
        (ALL, ALL): 7,
    }
    assert got[metrics_history.OTHER, metrics_history.OTHER].latency_p50_ms is None


async def test_a_failing_run_is_retried_with_backoff_and_shown(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = key_prefix + "metricsjob:"
    monkeypatch.setenv("FLYWHEEL_REDIS_PREFIX", prefix)
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/none")  # down
    redis = Redis.from_url(redis_url)
    ctx: dict[str, Any] = {"redis": redis, "job_try": 2}
    await startup(ctx)
    try:
        with pytest.raises(Retry) as retry:
            await persist_metrics(ctx)
        assert retry.value.defer_score == 10_000  # 5 s, doubled for the second try
        noted = (await read_jobs(redis, prefix))["persist_metrics"]
        assert noted["last_ok"] is False
        assert noted["consecutive_failures"] == 1
    finally:
        await shutdown(ctx)
        await redis.delete(prefix + "jobs")
        await redis.aclose()


async def test_rows_landing_long_after_their_bucket_count_from_the_late_mark(
    engine: AsyncEngine, t0: datetime
) -> None:
    await add(engine, [row(t0 + timedelta(seconds=5))])
    later = t0 + timedelta(seconds=10 * I + 100)
    await run(engine, later)
    assert (await points(engine, t0))[ALL, ALL].requests == 1
    # A backlog drained after an outage: rows of bucket t0 arrive ten buckets later.
    await add(engine, [row(t0 + timedelta(seconds=7)), row(t0 + timedelta(seconds=9))])
    await run(engine, later)
    assert (await points(engine, t0))[ALL, ALL].requests == 1  # not without the mark
    await persist(
        engine, now=later, interval_s=I, history_points=HISTORY, late=t0 + timedelta(seconds=7)
    )
    assert (await points(engine, t0))[ALL, ALL].requests == 3


async def test_a_failed_run_keeps_the_late_mark(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = key_prefix + "metricslate:"
    monkeypatch.setenv("FLYWHEEL_REDIS_PREFIX", prefix)
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/none")  # down
    redis = Redis.from_url(redis_url)
    await redis.zadd(late_key(prefix), {"oldest": 1234.5})
    ctx: dict[str, Any] = {"redis": redis, "job_try": 1}
    await startup(ctx)
    try:
        with pytest.raises(Retry):
            await persist_metrics(ctx)
        assert await redis.zscore(late_key(prefix), "oldest") == 1234.5
    finally:
        await shutdown(ctx)
        await redis.delete(prefix + "jobs", late_key(prefix))
        await redis.aclose()
