"""A route's figures as the virtuous cycle's completed runs recorded them: the latest
run's, and one point per run over a window (for the operator's charts). Read-only.

Each run stores every route's figures in one JSON column (`RoutePlan.figures()` in
app/cycle/engine.py); the history asks the database for the one route's part of it, so
a busy window moves a few hundred bytes a run, not every route's figures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.cycle_runs import iso
from app.store.metrics_history import as_utc
from app.store.schema import CycleRun

COMPLETED = "completed"
# At most this many points (the newest), however short the interval between runs.
MAX_RUNS = 1000
# Above this many runs, shaping the points for JSON moves off the event loop.
SHAPE_INLINE_MAX = 200
# The run-level figures a point and the route listing carry.
FIGURES = (
    "quality",
    "trend_per_h",
    "requests",
    "error_rate",
    "p95_latency_ms",
    "cost_per_request",
)


@dataclass(frozen=True, slots=True)
class LatestRun:
    id: str
    started_at: str | None
    routes: dict[str, Any]  # route → its figures in that run


@dataclass(frozen=True, slots=True)
class History:
    points: list[dict[str, Any]]  # oldest first
    truncated: bool  # more runs in the window than MAX_RUNS: the oldest were left out
    latest: LatestRun | None  # the newest point's run, when there is one


async def latest_run(engine: AsyncEngine) -> LatestRun | None:
    """The newest completed run with every route's figures (one indexed row)."""
    r = CycleRun
    query = (
        select(r.id, r.started_at, r.routes)
        .where(r.status == COMPLETED)
        .order_by(r.started_at.desc(), r.id.desc())
        .limit(1)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        return None
    return LatestRun(row.id, iso(row.started_at), row.routes or {})


async def route_history(engine: AsyncEngine, route: str, since: datetime) -> History:
    """One point per completed run started at or after `since`, oldest first; the
    newest MAX_RUNS when there are more."""
    r = CycleRun
    # The database picks the route's part of the JSON; SQLite's path does not escape a
    # quote or backslash in the name, so such a name is picked out here instead.
    plain = not any(c in route for c in '"\\')
    figures = r.routes[route] if plain else r.routes
    query = (
        select(r.id, r.started_at, figures.label("figures"))
        .where(r.status == COMPLETED, r.started_at >= since)
        .order_by(r.started_at.desc(), r.id.desc())
        .limit(MAX_RUNS + 1)  # one more tells whether any were left out
    )
    async with engine.connect() as conn:
        rows: Sequence[Row[Any] | Picked] = (await conn.execute(query)).all()
    if not plain:
        rows = [Picked(r.id, r.started_at, (r.figures or {}).get(route)) for r in rows]
    truncated = len(rows) > MAX_RUNS
    kept = rows[:MAX_RUNS]
    if len(kept) > SHAPE_INLINE_MAX:
        points = await asyncio.to_thread(_shape, kept)
    else:
        points = _shape(kept)
    latest = None
    if kept:
        newest = kept[0]
        latest = LatestRun(newest.id, iso(newest.started_at), {route: newest.figures or {}})
    return History(points, truncated, latest)


class Picked(NamedTuple):
    """A run's row with its route's figures picked out after reading (see above)."""

    id: str
    started_at: datetime
    figures: Any


def _shape(rows: Sequence[Row[Any] | Picked]) -> list[dict[str, Any]]:
    """The points oldest first (the rows come newest first)."""
    return [point(row.id, row.started_at, row.figures) for row in reversed(rows)]


def point(run_id: str, started_at: datetime, figures: dict[str, Any] | None) -> dict[str, Any]:
    """A run's point of a route; a run that did not cover the route has null figures."""
    figures = figures if isinstance(figures, dict) else {}
    deployments = figures.get("deployments")
    return {
        "run_id": run_id,
        "at": as_utc(started_at).isoformat(),
        **{name: figures.get(name) for name in FIGURES},
        "weights": figures.get("weights"),
        "deployments": {
            name: {"quality": f.get("quality"), "requests": f.get("requests")}
            for name, f in (deployments if isinstance(deployments, dict) else {}).items()
            if isinstance(f, dict)
        },
    }
