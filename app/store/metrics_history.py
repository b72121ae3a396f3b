"""Metrics history: request rows aggregated into one point per period and series.

A point covers one bucket (`interval_s` long, aligned to the Unix epoch, UTC) of one route
and deployment; route "*" / deployment "*" is all traffic, written even for an empty
bucket, so the history has no holes and the job can tell which buckets it has done.
Requests that never reached a route or deployment (an unknown model; cache hits have no
deployment) are filed under "-". A busy bucket keeps its `MAX_SERIES` busiest series and
folds the rest into "(other)" (counts only), so a client inventing model names cannot
grow the table without bound.

Percentiles are nearest-rank, computed by the database with window functions
(ROW_NUMBER / COUNT OVER, in SQLite ≥ 3.25 and PostgreSQL alike), so three rows per
series leave the database however busy the bucket. `errors_by_class` counts status
classes ("4xx", "5xx") and, beside them, the rows' `error_type` names. Cache hit rates
derive from the counts: L1 = hits_l1 / lookups, L2 = hits_l2 / (hits_l2 + misses),
where lookups = hits_l1 + hits_l2 + misses (bypassed requests never looked).

Writes (`persist`, `prune_points`) are for the workers; the HTTP endpoints read the
points with `app.store.metrics_read`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ColumnElement, Executable

from app.store.schema import MetricsPoint, RequestRow

ALL = "*"
NONE = "-"
OTHER = "(other)"
MAX_SERIES = 200
# Rows reach the database a little after their request (the consolidation worker), so
# a run also redoes every bucket that closed less than this long ago.
CONSOLIDATION_LAG_S = 60
PERCENTILES = (50, 95, 99)
KEY_COLUMNS = ("bucket_start", "route", "deployment")

SeriesKey = tuple[str, str]
# The Series fields that are integer sums.
_INT_SUMS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "hits_l1",
    "hits_l2",
    "misses",
    "quality_count",
)


def as_utc(ts: datetime) -> datetime:
    """SQLite hands timestamps back naive; everything stored here is UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def align(ts: datetime, interval_s: int) -> datetime:
    epoch = int(as_utc(ts).timestamp())
    return datetime.fromtimestamp(epoch - epoch % interval_s, UTC)


def window_start(now: datetime, interval_s: int, history_points: int) -> datetime:
    """The oldest bucket kept: `history_points` buckets, the open one included."""
    return align(now, interval_s) - timedelta(seconds=interval_s * (history_points - 1))


def plan_buckets(
    now: datetime,
    interval_s: int,
    history_points: int,
    last_point: datetime | None,
    first_request: datetime | None,
    late: datetime | None = None,
) -> list[datetime]:
    """The buckets a run (re)aggregates, oldest first.

    The open bucket and those closed within the consolidation lag always; since the last
    all-traffic point (or, on the first run, the first request) when the job was down;
    since the oldest request the consolidation wrote after the last run (`late`: rows
    that reached the database after their bucket was aggregated); never older than the
    history kept.
    """
    step = timedelta(seconds=interval_s)
    current = align(now, interval_s)
    start = align(now - timedelta(seconds=interval_s + CONSOLIDATION_LAG_S), interval_s)
    anchor = last_point if last_point is not None else first_request
    for mark in (anchor, late):
        if mark is not None:
            start = min(start, align(mark, interval_s))
    start = max(start, window_start(now, interval_s, history_points))
    count = int((current - start) / step) + 1
    return [start + i * step for i in range(count)]


def rank(n: int, p: int) -> int:
    """The nearest rank of percentile p among n values (1-based); SQL uses the same."""
    return (n * p + 99) // 100


@dataclass(slots=True)
class Series:
    requests: int = 0
    errors: int = 0
    errors_by_class: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    hits_l1: int = 0
    hits_l2: int = 0
    misses: int = 0
    quality_sum: float = 0.0
    quality_count: int = 0
    latency: dict[int, float] = field(default_factory=dict)
    ttft: dict[int, float] = field(default_factory=dict)

    def add(self, other: Series) -> None:
        """Sums only: percentiles do not add up."""
        for name in (*_INT_SUMS, "cost", "quality_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors_by_class.update(other.errors_by_class)

    def row(self, bucket: datetime, interval_s: int, key: SeriesKey) -> dict[str, Any]:
        return {
            "bucket_start": bucket,
            "bucket_s": interval_s,
            "route": key[0],
            "deployment": key[1],
            "requests": self.requests,
            "errors": self.errors,
            "errors_by_class": dict(self.errors_by_class),
            "latency_p50_ms": self.latency.get(50),
            "latency_p95_ms": self.latency.get(95),
            "latency_p99_ms": self.latency.get(99),
            "ttft_p50_ms": self.ttft.get(50),
            "ttft_p95_ms": self.ttft.get(95),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
            "cache_hits_l1": self.hits_l1,
            "cache_hits_l2": self.hits_l2,
            "cache_misses": self.misses,
            "quality_mean": self.quality_sum / self.quality_count if self.quality_count else None,
            "quality_count": self.quality_count,
        }


def _key(route: str | None, deployment: str | None) -> SeriesKey:
    return (route or NONE, deployment or NONE)


def _in_bucket(start: datetime, interval_s: int) -> ColumnElement[bool]:
    end = start + timedelta(seconds=interval_s)
    return and_(RequestRow.created_at >= start, RequestRow.created_at < end)


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


async def _sums(conn: AsyncConnection, where: ColumnElement[bool]) -> dict[SeriesKey, Series]:
    r = RequestRow
    query = (
        select(
            r.route,
            r.deployment,
            func.count().label("requests"),
            _count_if(r.status >= 400).label("errors"),
            func.coalesce(func.sum(r.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(r.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(r.cost), 0.0).label("cost"),
            _count_if(r.cache_tier == "hit-l1").label("hits_l1"),
            _count_if(r.cache_tier == "hit-l2").label("hits_l2"),
            _count_if(r.cache_tier == "miss").label("misses"),
            func.coalesce(func.sum(r.quality_score), 0.0).label("quality_sum"),
            func.count(r.quality_score).label("quality_count"),
        )
        .where(where)
        .group_by(r.route, r.deployment)
    )
    out: dict[SeriesKey, Series] = {}
    for row in await conn.execute(query):
        s = Series(cost=float(row.cost), quality_sum=float(row.quality_sum))
        for name in _INT_SUMS:
            setattr(s, name, int(row._mapping[name]))
        # NULL and "-" name the same series: add to it, never overwrite.
        out.setdefault(_key(row.route, row.deployment), Series()).add(s)
    errors = (
        select(r.route, r.deployment, r.status, r.error_type, func.count())
        .where(where, r.status >= 400)
        .group_by(r.route, r.deployment, r.status, r.error_type)
    )
    for route, deployment, status, error_type, n in await conn.execute(errors):
        s = out.setdefault(_key(route, deployment), Series())
        s.errors_by_class[f"{status // 100}xx"] += n
        if error_type:
            s.errors_by_class[error_type] += n
    return out


async def _percentiles(
    conn: AsyncConnection,
    where: ColumnElement[bool],
    column: Any,
    series: dict[SeriesKey, Series],
    total: Series,
    attr: str,
) -> None:
    """Fill `attr` ("latency"/"ttft") of each series and the total from the database."""
    r = RequestRow
    group = (r.route, r.deployment)
    inner = (
        select(
            r.route,
            r.deployment,
            column.label("v"),
            func.row_number().over(partition_by=group, order_by=column).label("rn"),
            func.count().over(partition_by=group).label("n"),
            func.row_number().over(order_by=column).label("rn_all"),
            func.count().over().label("n_all"),
        )
        .where(where, column.is_not(None))
        .subquery()
    )
    c = inner.c
    wanted = or_(
        c.rn.in_([(c.n * p + 99) // 100 for p in PERCENTILES]),
        c.rn_all.in_([(c.n_all * p + 99) // 100 for p in PERCENTILES]),
    )
    query = select(c.route, c.deployment, c.v, c.rn, c.n, c.rn_all, c.n_all).where(wanted)
    for route, deployment, value, rn, n, rn_all, n_all in await conn.execute(query):
        for p in PERCENTILES:
            if rn == rank(n, p) and (s := series.get(_key(route, deployment))) is not None:
                getattr(s, attr)[p] = float(value)
            if rn_all == rank(n_all, p):
                getattr(total, attr)[p] = float(value)


def _fold(series: dict[SeriesKey, Series]) -> dict[SeriesKey, Series]:
    if len(series) <= MAX_SERIES:
        return series
    ranked = sorted(series.items(), key=lambda kv: kv[1].requests, reverse=True)
    kept = dict(ranked[:MAX_SERIES])
    other = Series()
    for _, s in ranked[MAX_SERIES:]:
        other.add(s)
    kept[(OTHER, OTHER)] = other
    return kept


async def aggregate_bucket(
    conn: AsyncConnection, start: datetime, interval_s: int
) -> list[dict[str, Any]]:
    """The points of one bucket: one per series, and the all-traffic one (always)."""
    where = _in_bucket(start, interval_s)
    series = await _sums(conn, where)
    total = Series()
    for s in series.values():
        total.add(s)
    if series:
        await _percentiles(conn, where, RequestRow.latency_ms, series, total, "latency")
        await _percentiles(conn, where, RequestRow.ttft_ms, series, total, "ttft")
    rows = [s.row(start, interval_s, key) for key, s in _fold(series).items()]
    rows.append(total.row(start, interval_s, (ALL, ALL)))
    return rows


def _upsert(dialect: str) -> Executable:
    dialects: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
    if dialect not in dialects:
        raise NotImplementedError(f"metrics history has no upsert for {dialect}")
    stmt = dialects[dialect](MetricsPoint)
    columns = [c.name for c in MetricsPoint.__table__.columns]
    updates = {name: stmt.excluded[name] for name in columns if name not in (*KEY_COLUMNS, "id")}
    upsert: Executable = stmt.on_conflict_do_update(index_elements=list(KEY_COLUMNS), set_=updates)
    return upsert


async def replace_bucket(
    conn: AsyncConnection, start: datetime, rows: Sequence[dict[str, Any]]
) -> None:
    """Upsert the bucket's points and drop any of its series the new run no longer has."""
    mp = MetricsPoint
    keys = [(row["route"], row["deployment"]) for row in rows]
    await conn.execute(
        delete(mp).where(mp.bucket_start == start, tuple_(mp.route, mp.deployment).not_in(keys))
    )
    await conn.execute(_upsert(conn.dialect.name), list(rows))


async def persist(
    engine: AsyncEngine,
    *,
    now: datetime,
    interval_s: int,
    history_points: int,
    late: datetime | None = None,
) -> dict[str, Any]:
    """(Re)aggregate the buckets `plan_buckets` names, then prune; what it did, for the job."""
    async with engine.connect() as conn:
        last = (
            await conn.execute(
                # Not after `now`: a worker whose clock is ahead must not hide a gap.
                select(func.max(MetricsPoint.bucket_start)).where(
                    MetricsPoint.route == ALL, MetricsPoint.bucket_start <= now
                )
            )
        ).scalar()
        first = None
        if last is None:
            first = (await conn.execute(select(func.min(RequestRow.created_at)))).scalar()
    buckets = plan_buckets(
        now,
        interval_s,
        history_points,
        None if last is None else as_utc(last),
        None if first is None else as_utc(first),
        late,
    )
    requests = 0
    for bucket in buckets:
        # One transaction per bucket: a long catch-up keeps what it has done so far.
        async with engine.begin() as conn:
            rows = await aggregate_bucket(conn, bucket, interval_s)
            await replace_bucket(conn, bucket, rows)
        requests += rows[-1]["requests"]
    pruned = await prune_points(
        engine, now=now, interval_s=interval_s, history_points=history_points
    )
    return {
        "buckets": len(buckets),
        "first_bucket": buckets[0].isoformat(),
        "requests": requests,
        "pruned_points": pruned,
    }


async def prune_points(
    engine: AsyncEngine, *, now: datetime, interval_s: int, history_points: int
) -> int:
    cutoff = window_start(now, interval_s, history_points)
    async with engine.begin() as conn:
        result = await conn.execute(delete(MetricsPoint).where(MetricsPoint.bucket_start < cutoff))
    return int(result.rowcount or 0)
