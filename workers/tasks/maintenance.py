"""Maintenance: retention (daily) and VACUUM (weekly).

`prune_retention` deletes request rows older than `FLYWHEEL_REQUEST_RETENTION_DAYS` and
request bodies past their own `expires_at`, in chunks of `PRUNE_CHUNK` rows, one short
transaction each with a pause between, so the database (SQLite has one writer, and the
consolidator is writing) is never held for long. A run stops after `PRUNE_BUDGET_S`,
within the job timeout, and enqueues a follow-up for the rest. It also runs at worker
start-up, for installations that are not up at the daily hour. Then expired files
(`/v1/files` uploads and batch outputs), up to `FILES_CHUNK` a run.

`vacuum_database` returns the space freed by pruning and refreshes the planner's
statistics: VACUUM on SQLite, VACUUM ANALYZE on PostgreSQL. Neither can run inside a
transaction, hence the AUTOCOMMIT connection. SQLite's VACUUM needs the database to
itself for a moment; if a writer holds it, the job fails and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from arq import cron
from sqlalchemy import ColumnElement, delete, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import InstrumentedAttribute

from app.files.prune import prune_expired
from app.files.storage import FileStorage
from app.store.schema import RequestBody, RequestRow
from workers.context import get_context
from workers.tracking import tracked

PRUNE_CHUNK = 2000
FILES_CHUNK = 500  # expired files removed per run (each is a row and a file)
CHUNK_PAUSE_S = 0.05
PRUNE_BUDGET_S = 240.0
FOLLOW_UP_DEFER_S = 60.0
# asyncpg's command timeout (make_engine) is for requests' queries, not a VACUUM.
VACUUM_TIMEOUT_S = 3600.0


async def delete_in_chunks(
    engine: AsyncEngine,
    key: InstrumentedAttribute[str],
    condition: ColumnElement[bool],
    deadline: float,
) -> tuple[int, bool]:
    """Delete the rows matching `condition`, chunk by chunk: (deleted, stopped early)."""
    table = key.class_.__table__
    deleted = 0
    while True:
        chunk = select(key).where(condition).limit(PRUNE_CHUNK).scalar_subquery()
        async with engine.begin() as conn:
            result = await conn.execute(delete(table).where(key.in_(chunk)))
        n = int(result.rowcount or 0)
        deleted += n
        if n < PRUNE_CHUNK:
            return deleted, False
        if time.monotonic() >= deadline:
            return deleted, True
        # Let the consolidator's writes in between chunks.
        await asyncio.sleep(CHUNK_PAUSE_S)


async def prune(
    engine: AsyncEngine, *, now: datetime, retention_days: float, budget_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + budget_s
    cutoff = now - timedelta(days=retention_days)
    requests, more = await delete_in_chunks(
        engine, RequestRow.id, RequestRow.created_at < cutoff, deadline
    )
    bodies = 0
    if not more:
        bodies, more = await delete_in_chunks(
            engine, RequestBody.request_id, RequestBody.expires_at < now, deadline
        )
    return {
        "requests_deleted": requests,
        "bodies_deleted": bodies,
        "cutoff": cutoff.isoformat(),
        "more": more,
    }


@tracked
async def prune_retention(ctx: dict[str, Any]) -> dict[str, Any]:
    wctx = get_context(ctx)
    done = await prune(
        wctx.engine,
        now=datetime.now(UTC),
        retention_days=wctx.settings.flywheel_request_retention_days,
        budget_s=PRUNE_BUDGET_S,
    )
    if not done["more"]:
        # Expired files (`/v1/files`, batch outputs): rows, then their bytes.
        files = await prune_expired(
            wctx.engine, FileStorage.from_settings(wctx.settings), datetime.now(UTC)
        )
        done["files_deleted"] = files
        done["more"] = files >= FILES_CHUNK
    if done["more"]:
        await ctx["redis"].enqueue_job("prune_retention", _defer_by=FOLLOW_UP_DEFER_S)
    return done


async def vacuum(engine: AsyncEngine) -> dict[str, Any]:
    dialect = engine.dialect.name
    started = time.perf_counter()
    async with engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if dialect == "postgresql":
            driver = (await auto.get_raw_connection()).driver_connection
            assert driver is not None  # a checked-out connection has its asyncpg connection
            await driver.execute("VACUUM ANALYZE", timeout=VACUUM_TIMEOUT_S)
            statement = "VACUUM ANALYZE"
        elif dialect == "sqlite":
            await auto.execute(text("VACUUM"))
            statement = "VACUUM"
        else:
            return {"dialect": dialect, "skipped": True}
    return {
        "dialect": dialect,
        "statement": statement,
        "seconds": round(time.perf_counter() - started, 3),
    }


@tracked
async def vacuum_database(ctx: dict[str, Any]) -> dict[str, Any]:
    return await vacuum(get_context(ctx).engine)


FUNCTIONS = [prune_retention, vacuum_database]
CRONS = [
    # Quiet hours (the worker's clock), away from the top of the hour other jobs favour.
    cron(prune_retention, hour={3}, minute={17}, second={0}, run_at_startup=True),
    cron(
        vacuum_database,
        weekday={6},  # Sunday
        hour={4},
        minute={17},
        second={0},
        timeout=VACUUM_TIMEOUT_S + 60,
    ),
]
