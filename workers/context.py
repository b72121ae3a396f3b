"""What every job gets: settings, the database engine and the worker's identity.

Built once in arq's `on_startup` and kept in arq's ctx dict under one typed key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.background import stop_tasks
from app.config import Settings
from app.observability.tracing import Tracing, make_tracing
from app.store.db import DB_ERRORS, make_engine

CTX_KEY = "flywheel"
log = logging.getLogger("flywheel.worker")


@dataclass(slots=True)
class WorkerContext:
    settings: Settings
    engine: AsyncEngine
    tracing: Tracing
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    started_at: float = field(default_factory=time.time)
    beats: int = 0


def get_context(ctx: dict[str, Any]) -> WorkerContext:
    wctx: WorkerContext = ctx[CTX_KEY]
    return wctx


async def startup(ctx: dict[str, Any]) -> None:
    settings = Settings()
    tracing = make_tracing(
        settings.otel_service_name + "-worker", settings.otel_exporter_otlp_endpoint, None
    )
    ctx[CTX_KEY] = WorkerContext(
        settings=settings, engine=make_engine(settings.database_dsn), tracing=tracing
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    wctx = ctx.get(CTX_KEY)
    if isinstance(wctx, WorkerContext):
        await wctx.engine.dispose()
        await asyncio.to_thread(wctx.tracing.shutdown)  # flushes queued spans, bounded


async def finish(task: asyncio.Task[None], wait_s: float, what: str) -> None:
    """Let a long-lived task (told to stop) finish its work in hand, for up to `wait_s`;
    past that, cancel it."""
    try:
        await asyncio.wait_for(asyncio.shield(task), wait_s)
    except TimeoutError:
        log.warning("%s did not stop in %.0f s; cancelling it", what, wait_s)
        await stop_tasks(task)


# What a background loop rides out (logged once, and when it ends) rather than stops on.
OUTAGES = (RedisError, OSError, TimeoutError, *DB_ERRORS)


async def tick_until(
    stop: asyncio.Event,
    interval_s: float,
    tick: Callable[[], Awaitable[object]],
    what: str,
    logger: logging.Logger,
) -> None:
    """`tick()` every `interval_s` until `stop` is set. A Redis or database outage pauses
    the loop (one warning, then one line when it is over); a bug in one tick is logged;
    neither ends the loop, nor the worker."""
    down: str | None = None
    while not stop.is_set():
        try:
            await tick()
            if down is not None:
                logger.info("%s resumed after %s", what, down)
                down = None
        except OUTAGES as e:
            if down is None:
                logger.warning("%s paused: %s", what, type(e).__name__)
            down = type(e).__name__
        except Exception:  # a bug in one pass must not end the loop for good
            logger.exception("%s: a pass failed", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
