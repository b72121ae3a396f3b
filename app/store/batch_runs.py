"""A worker's side of a batch's row: who runs it (a lease), its progress, its moves.

A worker takes a batch by a conditional UPDATE (only while nobody holds it, or the
holder's lease lapsed), so two workers never run one batch and a crashed worker's
batch is taken over once its lease lapses. Every later write is conditioned on still
holding the lease: a worker that lost it (paused past the lease, say) finds out at its
next checkpoint and stops, instead of overwriting its successor.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.store.schema import Batch

# States a worker acts on; the rest are final.
RUNNABLE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
# The timestamp column each state sets when a batch enters it.
STAMPS = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


def _free(now: datetime) -> Any:
    return or_(Batch.lease_until.is_(None), Batch.lease_until < now)


async def claim_next(
    engine: AsyncEngine,
    worker: str,
    lease_s: float,
    now: datetime,
    skip: Sequence[str] = (),
) -> Batch | None:
    """The oldest runnable batch nobody holds, now held by `worker`; None if none."""
    until = now + timedelta(seconds=lease_s)
    async with engine.begin() as conn:
        query = (
            select(Batch.id)
            .where(Batch.status.in_(RUNNABLE), _free(now))
            .order_by(Batch.created_at, Batch.id)
            .limit(len(skip) + 4)
        )
        candidates = [i for i in (await conn.execute(query)).scalars() if i not in skip]
    for batch_id in candidates:
        async with engine.begin() as conn:
            took = await conn.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status.in_(RUNNABLE), _free(now))
                .values(lease_owner=worker, lease_until=until)
            )
        if took.rowcount == 1:
            return await load(engine, batch_id)
    return None


async def load(engine: AsyncEngine, batch_id: str) -> Batch | None:
    async with AsyncSession(engine, expire_on_commit=False) as session:
        return await session.get(Batch, batch_id)


async def checkpoint(
    engine: AsyncEngine,
    batch_id: str,
    worker: str,
    lease_s: float,
    now: datetime,
    **progress: Any,
) -> str | None:
    """Renew the lease and store `progress` (counts, usage); the batch's status now (a
    cancel shows up here), or None when `worker` no longer holds it."""
    async with engine.begin() as conn:
        done = await conn.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.lease_owner == worker)
            .values(lease_until=now + timedelta(seconds=lease_s), **progress)
        )
        if done.rowcount != 1:
            return None
        status: str = (
            await conn.execute(select(Batch.status).where(Batch.id == batch_id))
        ).scalar_one()
        return status


async def move(
    engine: AsyncEngine,
    batch_id: str,
    worker: str,
    to: str,
    now: datetime,
    *,
    from_: Sequence[str],
    **fields: Any,
) -> bool:
    """Move the batch from one of `from_` to `to` (stamping its time), with `fields`;
    False when it is not in `from_` any more or `worker` lost it."""
    values = dict(fields, status=to)
    if to in STAMPS:
        values[STAMPS[to]] = now
    if to in FINAL:
        values.update(lease_owner=None, lease_until=None)
    async with engine.begin() as conn:
        done = await conn.execute(
            update(Batch)
            .where(and_(Batch.id == batch_id, Batch.lease_owner == worker, Batch.status.in_(from_)))
            .values(**values)
        )
        return done.rowcount == 1


async def release(engine: AsyncEngine, batch_id: str, worker: str) -> None:
    """Let go of a batch that is not finished (the worker is stopping)."""
    async with engine.begin() as conn:
        await conn.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.lease_owner == worker)
            .values(lease_owner=None, lease_until=None)
        )
