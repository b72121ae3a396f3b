"""Prompt variants and experiments in the database.

Admin endpoints create variants and experiments; the worker decides them. A variant is
never deleted: retired and rolled-back ones are kept, for the record and for rollback.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.cycle_runs import iso, new_id
from app.store.schema import Experiment, PromptVariant

BASELINE = "baseline"  # the route's own prompt, as clients send it
LIVE = ("running", "watching")  # experiments that still hold traffic or a watch


def variant_json(row: Any) -> dict[str, Any]:
    return {
        "object": "prompt.variant",
        "id": row.id,
        "route": row.route,
        "name": row.name,
        "system_prompt": row.system_prompt,
        "params": row.params or {},
        "status": row.status,
        "source": row.source,
        "parent": row.parent,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def experiment_json(row: Any) -> dict[str, Any]:
    return {
        "object": "experiment",
        "id": row.id,
        "route": row.route,
        "status": row.status,
        "control": row.control,
        "arms": row.arms,
        "origin": row.origin,
        "started_at": iso(row.started_at),
        "decided_at": iso(row.decided_at),
        "ended_at": iso(row.ended_at),
        "winner": row.winner,
        "decision": row.decision,
        "watch": row.watch,
    }


async def create_variant(
    engine: AsyncEngine,
    at: datetime,
    *,
    route: str,
    name: str,
    system_prompt: str | None,
    params: dict[str, Any] | None,
    source: str,
    parent: str | None = None,
) -> dict[str, Any]:
    values = {
        "id": new_id("var"),
        "route": route,
        "name": name,
        "system_prompt": system_prompt,
        "params": params or {},
        "status": "candidate",
        "source": source,
        "parent": parent,
        "created_at": at,
        "updated_at": at,
    }
    async with engine.begin() as conn:
        await conn.execute(insert(PromptVariant).values(**values))
    return await get_variant(engine, str(values["id"])) or {}


async def get_variant(engine: AsyncEngine, variant_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(PromptVariant).where(PromptVariant.id == variant_id))
        ).first()
    return None if row is None else variant_json(row)


async def list_variants(
    engine: AsyncEngine, route: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    q = select(PromptVariant).order_by(PromptVariant.created_at.desc()).limit(limit)
    if route is not None:
        q = q.where(PromptVariant.route == route)
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(q)).all()
    return [variant_json(r) for r in rows]


async def set_variant_status(
    engine: AsyncEngine, variant_ids: Sequence[str], status: str, at: datetime
) -> None:
    ids = [v for v in variant_ids if v != BASELINE]
    if ids:
        async with engine.begin() as conn:
            await conn.execute(
                update(PromptVariant)
                .where(PromptVariant.id.in_(ids))
                .values(status=status, updated_at=at)
            )


async def create_experiment(
    engine: AsyncEngine,
    at: datetime,
    *,
    route: str,
    control: str,
    arms: dict[str, float],
    origin: str,
) -> dict[str, Any]:
    values = {
        "id": new_id("exp"),
        "route": route,
        "status": "running",
        "control": control,
        "arms": arms,
        "origin": origin,
        "started_at": at,
    }
    async with engine.begin() as conn:
        await conn.execute(insert(Experiment).values(**values))
    await set_variant_status(engine, [a for a in arms if a != control], "testing", at)
    return await get_experiment(engine, str(values["id"])) or {}


async def get_experiment(engine: AsyncEngine, experiment_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(Experiment).where(Experiment.id == experiment_id))).first()
    return None if row is None else experiment_json(row)


async def list_experiments(
    engine: AsyncEngine,
    route: str | None = None,
    statuses: Sequence[str] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    q = select(Experiment).order_by(Experiment.started_at.desc()).limit(limit)
    if route is not None:
        q = q.where(Experiment.route == route)
    if statuses is not None:
        q = q.where(Experiment.status.in_(list(statuses)))
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(q)).all()
    return [experiment_json(r) for r in rows]


async def update_experiment(engine: AsyncEngine, experiment_id: str, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(Experiment).where(Experiment.id == experiment_id).values(**values)
        )


async def promoted_variant(engine: AsyncEngine, route: str) -> dict[str, Any] | None:
    """The route's current promoted variant (its prompt is the baseline now), if any."""
    q = (
        select(PromptVariant)
        .where(PromptVariant.route == route, PromptVariant.status == "promoted")
        .order_by(PromptVariant.updated_at.desc())
        .limit(1)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return None if row is None else variant_json(row)


async def promoted_ids(engine: AsyncEngine) -> dict[str, str]:
    """Each route's promoted variant id (routes without one left out)."""
    q = select(PromptVariant.route, PromptVariant.id).where(PromptVariant.status == "promoted")
    async with engine.connect() as conn:
        rows: Sequence[Any] = (await conn.execute(q)).all()
    return {str(route): str(vid) for route, vid in rows}
