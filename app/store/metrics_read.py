"""Metrics history, read for the HTTP endpoints: the points the workers persisted
(`app.store.metrics_history`), shaped as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.metrics_history import ALL, SeriesKey, as_utc
from app.store.schema import MetricsPoint

# Above this many points, shaping the history for JSON moves off the event loop.
SHAPE_INLINE_MAX = 2000


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def point_json(p: MetricsPoint | Row[Any]) -> dict[str, Any]:
    lookups = p.cache_hits_l1 + p.cache_hits_l2 + p.cache_misses
    return {
        "bucket_start": as_utc(p.bucket_start).isoformat(),
        "bucket_s": p.bucket_s,
        "requests": p.requests,
        "errors": p.errors,
        "error_rate": _ratio(p.errors, p.requests),
        "errors_by_class": p.errors_by_class or {},
        "latency_ms": {"p50": p.latency_p50_ms, "p95": p.latency_p95_ms, "p99": p.latency_p99_ms},
        "ttft_ms": {"p50": p.ttft_p50_ms, "p95": p.ttft_p95_ms},
        "prompt_tokens": p.prompt_tokens,
        "completion_tokens": p.completion_tokens,
        "cost": p.cost,
        "cache": {
            "hits_l1": p.cache_hits_l1,
            "hits_l2": p.cache_hits_l2,
            "misses": p.cache_misses,
            "hit_rate": {
                "l1": _ratio(p.cache_hits_l1, lookups),
                "l2": _ratio(p.cache_hits_l2, p.cache_hits_l2 + p.cache_misses),
                "any": _ratio(p.cache_hits_l1 + p.cache_hits_l2, lookups),
            },
        },
        "quality": {"mean": p.quality_mean, "count": p.quality_count},
    }


def _shape(rows: Iterable[Row[Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    totals: list[dict[str, Any]] = []
    series: dict[SeriesKey, list[dict[str, Any]]] = {}
    for row in rows:
        point = point_json(row)
        if row.route == ALL:
            totals.append(point)
        else:
            series.setdefault((row.route, row.deployment), []).append(point)
    listed = [{"route": k[0], "deployment": k[1], "points": v} for k, v in sorted(series.items())]
    return totals, listed


async def read_history(
    engine: AsyncEngine,
    *,
    hours: int,
    now: datetime,
    series: bool = True,
    route: str | None = None,
) -> dict[str, Any]:
    """The points of the last `hours` hours, oldest first: totals, and each series
    (without `series`, the all-traffic points alone: what an overview draws; with a
    `route`, the totals and that route's series alone: what a route's page draws)."""
    since = now - timedelta(hours=hours)
    mp = MetricsPoint.__table__
    query = (
        select(mp)
        .where(mp.c.bucket_start > since, mp.c.bucket_start <= now)
        .order_by(mp.c.bucket_start, mp.c.route, mp.c.deployment)
    )
    if not series:
        query = query.where(mp.c.route == ALL)
    elif route is not None:
        query = query.where(mp.c.route.in_((ALL, route)))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    if len(rows) > SHAPE_INLINE_MAX:
        totals, listed = await asyncio.to_thread(_shape, rows)
    else:
        totals, listed = _shape(rows)
    return {
        "object": "metrics.history",
        "hours": hours,
        "from": since.isoformat(),
        "to": now.isoformat(),
        "totals": totals,
        "series": listed,
    }


async def latest_total(engine: AsyncEngine) -> dict[str, Any] | None:
    """The newest all-traffic point (one indexed row), or None before the first run."""
    mp = MetricsPoint.__table__
    query = select(mp).where(mp.c.route == ALL).order_by(mp.c.bucket_start.desc()).limit(1)
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    return None if row is None else point_json(row)
