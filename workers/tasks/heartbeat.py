"""The worker heartbeat: proof of life for `/health/detailed`, in Redis and the database."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.exc import SQLAlchemyError

from app.background import stop_tasks
from app.store.heartbeat import HEARTBEAT_INTERVAL_S, write_beat
from app.store.schema import WorkerHeartbeat
from workers.context import get_context

log = logging.getLogger("flywheel.worker")
TASK_KEY = "heartbeat"


async def heartbeat(ctx: dict[str, Any]) -> int:
    wctx = get_context(ctx)
    wctx.beats += 1
    info = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": wctx.started_at,
        "beats": wctx.beats,
    }
    await write_beat(ctx["redis"], wctx.settings.flywheel_redis_prefix, wctx.worker_id, info)
    try:
        await _store(wctx.engine, wctx.worker_id, wctx.started_at, wctx.beats)
    except SQLAlchemyError as e:
        # The database being down must not stop the worker from reporting through Redis.
        log.warning("heartbeat not stored in the database: %s", type(e).__name__)
    return wctx.beats


async def _store(engine: Any, worker_id: str, started_at: float, beats: int) -> None:
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        result = await conn.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.worker_id == worker_id)
            .values(last_beat_at=now, beats=beats)
        )
        if result.rowcount == 0:
            await conn.execute(
                insert(WorkerHeartbeat).values(
                    worker_id=worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=datetime.fromtimestamp(started_at, UTC),
                    last_beat_at=now,
                    beats=beats,
                )
            )


async def _beat_forever(ctx: dict[str, Any]) -> None:
    while True:
        try:
            await heartbeat(ctx)
        except Exception:  # Redis away: the beat is missed and shows as such; keep going
            log.warning("heartbeat not written", exc_info=True)
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)


async def on_startup(ctx: dict[str, Any]) -> None:
    # Every worker beats for itself (a cron job would run on one worker per tick, and
    # the others would look dead in /health/detailed).
    ctx[TASK_KEY] = asyncio.create_task(_beat_forever(ctx), name="flywheel-heartbeat")


async def on_shutdown(ctx: dict[str, Any]) -> None:
    task = ctx.pop(TASK_KEY, None)
    await stop_tasks(task)


FUNCTIONS = [heartbeat]
CRONS: list[Any] = []
