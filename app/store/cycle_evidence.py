"""The cycle's evidence from the database: per (route, deployment, variant) and time
bucket, the counts and sums `app.cycle.evidence` summarises.

The database does the scanning and hands back one row per arm and bucket, on PostgreSQL
and SQLite alike: counts, sums, sums of squares and a latency histogram (neither
PERCENTILE nor a portable epoch function exists, so the bucket index is the one
dialect-specific expression). Only answers a deployment gave count: cache hits say
nothing new about it, and requests the gateway refused never reached one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, Integer, and_, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cycle.evidence import LATENCY_BOUNDS_MS, Bucket, merge
from app.store.alerts import is_error
from app.store.schema import RequestRow

CHAT = "chat.completions"


@dataclass(frozen=True, slots=True)
class ArmKey:
    route: str
    deployment: str
    variant: str | None


def _bucket_index(dialect: str, bucket_s: int) -> ColumnElement[Any]:
    r = RequestRow
    if dialect == "postgresql":
        epoch: ColumnElement[Any] = func.extract("epoch", r.created_at)
    else:  # SQLite keeps UTC timestamps as text, which strftime reads
        epoch = cast(func.strftime("%s", r.created_at), Integer)
    return func.floor(cast(epoch, Float) / bucket_s)


def _histogram() -> list[ColumnElement[Any]]:
    """One count per latency bin: (previous bound, bound]."""
    r = RequestRow
    columns: list[ColumnElement[Any]] = []
    low: float | None = None
    for high in (*LATENCY_BOUNDS_MS, None):
        cond: list[ColumnElement[bool]] = []
        if low is not None:
            cond.append(r.latency_ms > low)
        if high is not None:
            cond.append(r.latency_ms <= high)
        columns.append(func.sum(case((and_(*cond), 1), else_=0)))
        low = high
    return columns


async def load_buckets(
    engine: AsyncEngine,
    lo: datetime,
    hi: datetime,
    bucket_s: int,
    routes: Collection[str] | None = None,
) -> dict[ArmKey, list[Bucket]]:
    """Every arm's buckets of chat answers that started in [lo, hi), oldest first."""
    r = RequestRow
    index = _bucket_index(engine.dialect.name, bucket_s).label("b")
    q = r.quality_score
    query = (
        select(
            r.route,
            r.deployment,
            r.variant,
            index,
            func.count(),
            func.sum(case((is_error(), 1), else_=0)),
            func.count(q),
            func.coalesce(func.sum(q), 0.0),
            func.coalesce(func.sum(q * q), 0.0),
            func.coalesce(func.sum(r.cost), 0.0),
            *_histogram(),
        )
        .where(
            r.created_at >= lo,
            r.created_at < hi,
            r.endpoint == CHAT,
            r.route.is_not(None),
            r.deployment.is_not(None),
            r.cache_tier.not_in(("hit-l1", "hit-l2")),
        )
        .group_by(r.route, r.deployment, r.variant, index)
        .order_by(index)
    )
    if routes is not None:
        query = query.where(r.route.in_(list(routes)))
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(query)).all()
    out: dict[ArmKey, list[Bucket]] = {}
    for row in rows:
        route, deployment, variant, b, count, errors, scored, q_sum, q_sq, cost, *hist = row
        out.setdefault(ArmKey(route, deployment, variant), []).append(
            Bucket(
                start=float(b) * bucket_s,
                requests=int(count),
                errors=int(errors or 0),
                scored=int(scored or 0),
                q_sum=float(q_sum),
                q_sq=float(q_sq),
                cost_sum=float(cost),
                latency_hist=[int(h or 0) for h in hist],
            )
        )
    return out


def _grouped(
    arms: Mapping[ArmKey, list[Bucket]], of: Callable[[ArmKey], str | None]
) -> dict[str, list[Bucket]]:
    """The arms' buckets added up per `of(key)` (arms for which it is None left out)."""
    grouped: dict[str, list[list[Bucket]]] = {}
    for key, buckets in arms.items():
        name = of(key)
        if name is not None:
            grouped.setdefault(name, []).append(buckets)
    return {name: merge(*parts) for name, parts in grouped.items()}


def by_route(arms: Mapping[ArmKey, list[Bucket]]) -> dict[str, list[Bucket]]:
    """Each route's buckets, all its deployments and variants together."""
    return _grouped(arms, lambda k: k.route)


def by_deployment(arms: Mapping[ArmKey, list[Bucket]], route: str) -> dict[str, list[Bucket]]:
    """A route's buckets per deployment, its variants together."""
    return _grouped(arms, lambda k: k.deployment if k.route == route else None)


def by_variant(arms: Mapping[ArmKey, list[Bucket]], route: str) -> dict[str, list[Bucket]]:
    """A route's buckets per variant ("baseline" for requests that had none)."""
    return _grouped(arms, lambda k: (k.variant or "baseline") if k.route == route else None)
