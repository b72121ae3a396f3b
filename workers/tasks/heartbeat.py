"""The worker heartbeat: proof of life for `/health/detailed`, in Redis and the database."""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

from arq import cron
from sqlalchemy import insert, update
from sqlalchemy.exc import SQLAlchemyError

from app.store.heartbeat import HEARTBEAT_INTERVAL_S, write_beat
from app.store.schema import WorkerHeartbeat
from workers.context import get_context

log = logging.getLogger("flywheel.worker")


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


FUNCTIONS = [heartbeat]
CRONS = [
    # One beat per interval across the fleet: it proves the queue is being worked, and
    # names the worker that ran it.
    cron(heartbeat, second=set(range(0, 60, HEARTBEAT_INTERVAL_S)), run_at_startup=True),
]
