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
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.observability.tracing import Tracing, make_tracing
from app.store.db import make_engine

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
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
