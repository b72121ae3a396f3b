"""Cycle runs and decisions in the database: written by the worker, read by the API.

A run row is inserted when the run starts (status `running`) and completed at its end,
so a run that crashed shows as `failed` or stays `running` with its start time. Each
decision is a row of its own with its statistics; a later run fills in its outcome, and
the success rate per (route, kind) is read back from those rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.metrics_history import as_utc
from app.store.schema import CycleDecision, CycleRun


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else as_utc(ts).isoformat()


async def start_run(
    engine: AsyncEngine, run_id: str, at: datetime, trigger: str, job_id: str | None
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(CycleRun).values(
                id=run_id, started_at=at, trigger=trigger, job_id=job_id, status="running"
            )
        )


async def finish_run(
    engine: AsyncEngine,
    run_id: str,
    at: datetime,
    *,
    status: str,
    routes: dict[str, Any] | None = None,
    findings: list[dict[str, Any]] | None = None,
    actions: list[dict[str, Any]] | None = None,
    outcomes: list[dict[str, Any]] | None = None,
    error: str | None = None,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(CycleRun)
            .where(CycleRun.id == run_id)
            .values(
                finished_at=at,
                status=status,
                routes=routes,
                findings=findings,
                actions=actions,
                outcomes=outcomes,
                error=error,
            )
        )


def run_json(row: Any, full: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object": "cycle.run",
        "id": row.id,
        "status": row.status,
        "trigger": row.trigger,
        "job_id": row.job_id,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "findings": len(row.findings or ()),
        "actions": len(row.actions or ()),
    }
    if full:
        out |= {
            "routes": row.routes or {},
            "findings": row.findings or [],
            "actions": row.actions or [],
            "outcomes": row.outcomes or [],
            "error": row.error,
        }
    return out


async def list_runs(
    engine: AsyncEngine, limit: int = 20, before: datetime | None = None
) -> list[dict[str, Any]]:
    """Newest first, without their bulky details (`get_run` has them)."""
    q = select(CycleRun).order_by(CycleRun.started_at.desc(), CycleRun.id.desc()).limit(limit)
    if before is not None:
        q = q.where(CycleRun.started_at < before)
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(q)).all()
    return [run_json(r, full=False) for r in rows]


async def get_run(engine: AsyncEngine, run_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(CycleRun).where(CycleRun.id == run_id))).first()
    return None if row is None else run_json(row)


async def last_run(engine: AsyncEngine, status: str | None = None) -> dict[str, Any] | None:
    q = select(CycleRun).order_by(CycleRun.started_at.desc()).limit(1)
    if status is not None:
        q = q.where(CycleRun.status == status)
    async with engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return None if row is None else run_json(row)


async def add_decisions(engine: AsyncEngine, decisions: list[dict[str, Any]]) -> None:
    if decisions:
        async with engine.begin() as conn:
            await conn.execute(insert(CycleDecision), decisions)


def decision(
    run_id: str | None,
    at: datetime,
    route: str,
    kind: str,
    subject: str | None,
    stats: dict[str, Any] | None,
    outcome: str = "pending",
) -> dict[str, Any]:
    """A decision row (every key, so a batch insert takes all columns)."""
    return {
        "id": new_id("dec"),
        "run_id": run_id,
        "created_at": at,
        "route": route,
        "kind": kind,
        "subject": subject,
        "stats": stats,
        "outcome": outcome,
        "outcome_stats": None,
        "measured_at": None,
    }


async def pending_decisions(
    engine: AsyncEngine, before: datetime, kind: str
) -> list[dict[str, Any]]:
    """Decisions of `kind` taken before `before` whose outcome nobody measured yet."""
    d = CycleDecision
    q = (
        select(CycleDecision)
        .where(d.outcome == "pending", d.kind == kind, d.created_at < before)
        .order_by(CycleDecision.created_at)
        .limit(500)
    )
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(q)).all()
    return [
        {
            "id": r.id,
            "route": r.route,
            "kind": r.kind,
            "subject": r.subject,
            "stats": r.stats or {},
            "created_at": as_utc(r.created_at),
        }
        for r in rows
    ]


async def set_outcome(
    engine: AsyncEngine, decision_id: str, outcome: str, stats: dict[str, Any], at: datetime
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(CycleDecision)
            .where(CycleDecision.id == decision_id)
            .values(outcome=outcome, outcome_stats=stats, measured_at=at)
        )


async def settle(
    engine: AsyncEngine,
    route: str,
    kind: str,
    subject: str,
    outcome: str,
    stats: dict[str, Any],
    at: datetime,
) -> None:
    """Measure the pending decisions of `kind` on `subject` (a promotion when its watch
    ends, candidates when their experiment does)."""
    d = CycleDecision
    async with engine.begin() as conn:
        await conn.execute(
            update(d)
            .where(d.route == route, d.kind == kind, d.subject == subject, d.outcome == "pending")
            .values(outcome=outcome, outcome_stats=stats, measured_at=at)
        )


async def success_rates(engine: AsyncEngine) -> dict[tuple[str, str], tuple[int, int]]:
    """(route, kind) → (successes, measured) over every measured decision."""
    d = CycleDecision
    q = (
        select(d.route, d.kind, d.outcome, func.count())
        .where(d.outcome.in_(("success", "failure")))
        .group_by(d.route, d.kind, d.outcome)
    )
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(q)).all()
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for route, kind, outcome, n in rows:
        won, total = out.get((route, kind), (0, 0))
        out[(route, kind)] = (won + (int(n) if outcome == "success" else 0), total + int(n))
    return out
