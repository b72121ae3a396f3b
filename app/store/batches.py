"""Batches (`/v1/batches`) in the database, and their OpenAI wire shape.

The API creates a batch as `validating` and may move it to `cancelling`; the workers
find it by polling the table and take it from there. Both write the same row, so the
API's one state change is a conditional UPDATE: it only applies to a batch still in a
state a cancel can stop, whatever a worker did in between.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.metrics_history import as_utc
from app.store.owned import detached, page
from app.store.schema import Batch

# OpenAI accepts only "24h"; a batch not done by then expires (what is done is kept).
WINDOWS = {"24h": timedelta(hours=24)}
CANCELLABLE = ("validating", "in_progress")
# Too late to cancel: the results are being written, or the batch is over.
UNCANCELLABLE = ("finalizing", "completed", "failed", "expired")


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


def _unix(ts: datetime | None) -> int | None:
    return None if ts is None else int(as_utc(ts).timestamp())


def _errors(errors: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if not errors:
        return None
    data = [
        {k: e.get(k) for k in ("code", "message", "param", "line")}
        for e in errors
        if isinstance(e, dict)
    ]
    return {"object": "list", "data": data}


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return int(value) if isinstance(value, int | float) else 0


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's usage object; zeros until the worker has counted something. The details
    are read nested (OpenAI's shape) or flat (`cached_tokens`, `reasoning_tokens`)."""
    u = usage or {}
    inp = u.get("input_tokens_details")
    out = u.get("output_tokens_details")
    input_tokens, output_tokens = _count(u, "input_tokens"), _count(u, "output_tokens")
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": _count(inp if isinstance(inp, dict) else u, "cached_tokens")
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {
            "reasoning_tokens": _count(out if isinstance(out, dict) else u, "reasoning_tokens")
        },
        "total_tokens": _count(u, "total_tokens") or input_tokens + output_tokens,
    }


def batch_object(row: Batch) -> dict[str, Any]:
    """The batch as OpenAI returns it (what `openai.types.Batch` parses)."""
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": _errors(row.errors),
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": _unix(row.created_at),
        "in_progress_at": _unix(row.in_progress_at),
        "expires_at": _unix(row.expires_at),
        "finalizing_at": _unix(row.finalizing_at),
        "completed_at": _unix(row.completed_at),
        "failed_at": _unix(row.failed_at),
        "expired_at": _unix(row.expired_at),
        "cancelling_at": _unix(row.cancelling_at),
        "cancelled_at": _unix(row.cancelled_at),
        "request_counts": {
            "total": row.total or 0,
            "completed": row.completed or 0,
            "failed": row.failed or 0,
        },
        "metadata": row.metadata_,
        "model": row.model,
        "usage": _usage(row.usage),
    }


async def create_batch(
    engine: AsyncEngine,
    *,
    owner: str | None,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    output_expires_s: int | None,
    total: int,
    now: datetime,
) -> Batch:
    row = Batch(
        id=new_batch_id(),
        owner=owner,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status="validating",
        metadata_=metadata,
        output_expires_s=output_expires_s,
        total=total,
        completed=0,
        failed=0,
        created_at=now,
        expires_at=now + WINDOWS.get(completion_window, WINDOWS["24h"]),
    )
    async with detached(engine) as session, session.begin():
        session.add(row)
    return row


async def get_batch(engine: AsyncEngine, batch_id: str) -> Batch | None:
    async with detached(engine) as session:
        return await session.get(Batch, batch_id)


async def list_batches(
    engine: AsyncEngine, *, owner: str | None, everyone: bool, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """A page of batches, newest first, and whether more follow (`app.store.owned`)."""
    return await page(
        engine, select(Batch), Batch, owner=owner, everyone=everyone, after=after, limit=limit
    )


async def cancel_batch(engine: AsyncEngine, batch_id: str, now: datetime) -> Batch | None:
    """Ask a batch to stop: `validating`/`in_progress` become `cancelling` (the worker
    finishes the job, to `cancelled`); any other state is left as it is. The row as it
    is afterwards, or None if there is none."""
    async with detached(engine) as session, session.begin():
        # One conditional UPDATE: on PostgreSQL a concurrent worker update makes it
        # re-check the status on the new row version; SQLite serialises writers.
        await session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(CANCELLABLE))
            .values(status="cancelling", cancelling_at=now)
            .execution_options(synchronize_session=False)
        )
        return await session.get(Batch, batch_id, populate_existing=True)
