"""Alerts in the database: the per-deployment aggregates the detector reads, and the
alerts it stores.

The aggregates are counts, sums and sums of squares (`Moments`), so the database does
the scanning and hands back a few numbers per deployment, on PostgreSQL and SQLite
alike (neither STDDEV nor PERCENTILE is portable). Requests are placed in time by their
start (`created_at`), feedback by when it was given: a quality drop is noticed as the
scores come in; no feedback gives no quality signal. Writes are for the workers;
`list_alerts` only reads, for the admin API.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from app.observability.anomaly import Candidate, DeploymentStats, Moments, Period
from app.store.schema import Alert, Feedback, RequestRow

# What a deployment answers for: upstream failures, timeouts and rate limits. Other 4xx
# are the client's own mistakes and say nothing about the deployment.
ERROR_STATUSES = (408, 429)

# The tenant the master key's requests and feedback are filed under.
MASTER_TENANT = "master"

Key = tuple[str, str]  # (route, deployment)


@dataclass(frozen=True, slots=True)
class Span:
    """The window [now - window_s, now) and the baseline just before it."""

    now: datetime
    window_s: float
    baseline_s: float

    @property
    def window_start(self) -> datetime:
        return self.now - timedelta(seconds=self.window_s)

    @property
    def baseline_start(self) -> datetime:
        return self.window_start - timedelta(seconds=self.baseline_s)


def is_error() -> ColumnElement[bool]:
    """A request the deployment failed (the `ERROR_STATUSES` or a 5xx)."""
    r = RequestRow
    return or_(r.status >= 500, r.status.in_(ERROR_STATUSES))


def _requests_query(lo: datetime, hi: datetime) -> Executable:
    r = RequestRow
    ok = r.status < 400
    return (
        select(
            r.route,
            r.deployment,
            func.count(),
            func.sum(case((is_error(), 1), else_=0)),
            func.sum(case((ok, 1), else_=0)),
            func.sum(case((ok, r.latency_ms), else_=0.0)),
            func.sum(case((ok, r.latency_ms * r.latency_ms), else_=0.0)),
        )
        .where(
            r.created_at >= lo,
            r.created_at < hi,
            r.route.is_not(None),
            r.deployment.is_not(None),
        )
        .group_by(r.route, r.deployment)
    )


def _feedback_query(lo: datetime, hi: datetime) -> Executable:
    r, f = RequestRow, Feedback
    return (
        select(
            r.route,
            r.deployment,
            func.count(),
            func.sum(f.score),
            func.sum(f.score * f.score),
        )
        .join(r, r.id == f.request_id)
        .where(
            # The request owner's score (or the master key's), as the other readers of
            # feedback take it: another tenant's opinion of an answer is not its quality.
            or_(f.tenant == r.tenant, f.tenant == MASTER_TENANT),
            f.created_at >= lo,
            f.created_at < hi,
            r.route.is_not(None),
            r.deployment.is_not(None),
        )
        .group_by(r.route, r.deployment)
    )


def _moments(n: Any, total: Any, squares: Any) -> Moments:
    # PostgreSQL sums integers into NUMERIC (Decimal) and either database gives NULL
    # for a sum over no rows.
    return Moments(int(n or 0), float(total or 0.0), float(squares or 0.0))


async def _period(conn: AsyncConnection, lo: datetime, hi: datetime) -> dict[Key, Period]:
    periods: dict[Key, Period] = {}
    for route, deployment, n, errors, ok, total, squares in await conn.execute(
        _requests_query(lo, hi)
    ):
        periods[(route, deployment)] = Period(
            requests=int(n), errors=int(errors or 0), latency=_moments(ok, total, squares)
        )
    for route, deployment, n, total, squares in await conn.execute(_feedback_query(lo, hi)):
        period = periods.get((route, deployment), Period())
        periods[(route, deployment)] = Period(
            period.requests, period.errors, period.latency, _moments(n, total, squares)
        )
    return periods


async def deployment_stats(engine: AsyncEngine, span: Span) -> list[DeploymentStats]:
    """Each (route, deployment) seen in the window or the baseline, with both periods."""
    async with engine.connect() as conn:
        window = await _period(conn, span.window_start, span.now)
        baseline = await _period(conn, span.baseline_start, span.window_start)
    return [
        DeploymentStats(*k, window.get(k, Period()), baseline.get(k, Period()))
        for k in sorted(window.keys() | baseline.keys())
    ]


def new_alert_id() -> str:
    return f"alert_{uuid.uuid4().hex[:24]}"


async def insert_alert(
    engine: AsyncEngine, candidate: Candidate, now: datetime, webhook_status: str
) -> dict[str, Any]:
    """Store the alert; its row as a dict (the shape `alert_json` renders)."""
    values: dict[str, Any] = {
        "id": new_alert_id(),
        "created_at": now,
        "subject": candidate.subject,
        "route": candidate.route,
        "deployment": candidate.deployment,
        "kind": candidate.kind,
        "severity": candidate.severity,
        "z_score": candidate.z,
        "health": candidate.health,
        "value": candidate.value,
        "baseline": candidate.baseline,
        "message": candidate.message,
        "details": candidate.details,
        "webhook_status": webhook_status,
    }
    async with engine.begin() as conn:
        await conn.execute(insert(Alert).values(**values))
    return values


async def set_webhook_status(engine: AsyncEngine, alert_id: str, status: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(Alert).where(Alert.id == alert_id).values(webhook_status=status))


async def list_alerts(
    engine: AsyncEngine,
    *,
    limit: int = 100,
    kind: str | None = None,
    subject: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """Newest first, as `alert_json` renders them."""
    query = select(Alert).order_by(Alert.created_at.desc(), Alert.id.desc()).limit(limit)
    if kind is not None:
        query = query.where(Alert.kind == kind)
    if subject is not None:
        query = query.where(Alert.subject == subject)
    if since is not None:
        query = query.where(Alert.created_at >= since)
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(query)).mappings().all()
    return [alert_json(dict(row)) for row in rows]


def alert_json(row: dict[str, Any]) -> dict[str, Any]:
    """The alert as the admin API lists it and the webhook receives it."""
    created: datetime = row["created_at"]
    # SQLite hands timestamps back naive; every one stored here is UTC.
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    return {
        "object": "alert",
        "id": row["id"],
        "created_at": created.isoformat(),
        "subject": row["subject"],
        "route": row["route"],
        "deployment": row["deployment"],
        "kind": row["kind"],
        "severity": row["severity"],
        "z_score": row["z_score"],
        "health": row["health"],
        "value": row["value"],
        "baseline": row["baseline"],
        "message": row["message"],
        "details": row["details"] or {},
        "webhook_status": row["webhook_status"],
    }
