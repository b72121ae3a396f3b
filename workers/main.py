"""arq worker settings: `arq workers.main.WorkerSettings` (or `flywheel worker`).

Each task module exports FUNCTIONS (jobs that can be enqueued by name) and CRONS
(its schedule), and may define `on_startup(ctx)` / `on_shutdown(ctx)` for work that
lives as long as the worker (the consolidator); this module only gathers them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from arq.connections import RedisSettings

from app.config import Settings
from app.observability.logging import configure_logging
from workers.context import shutdown, startup
from workers.tasks import (
    alerts,
    batches,
    consolidate,
    cycle,
    heartbeat,
    maintenance,
    metrics,
    snapshots,
)

_settings = Settings()
log = logging.getLogger("flywheel.worker")
TASK_MODULES: tuple[Any, ...] = (
    heartbeat,
    consolidate,
    metrics,
    maintenance,
    snapshots,
    alerts,
    cycle,
    batches,
)


async def on_startup(ctx: dict[str, Any]) -> None:
    # arq's command line set up a handler of its own; the worker's lines get the
    # gateway's format (JSON outside dev), request ids and masking.
    configure_logging(_settings.flywheel_log_level, json=_settings.flywheel_env != "dev")
    lower_priority(_settings.flywheel_worker_nice)
    await startup(ctx)
    for module in TASK_MODULES:
        hook = getattr(module, "on_startup", None)
        if hook is not None:
            await hook(ctx)


def lower_priority(increment: int) -> None:
    """Background work below live traffic on a shared CPU (never raised: only lowered,
    which needs no privilege)."""
    if increment > 0 and hasattr(os, "nice"):
        try:
            os.nice(increment)
        except OSError as e:
            log.warning("worker priority not lowered: %s", e)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    # Long-lived work first (the consolidator finishes its batch), then the engine.
    for module in reversed(TASK_MODULES):
        hook = getattr(module, "on_shutdown", None)
        if hook is not None:
            await hook(ctx)
    await shutdown(ctx)


def redis_settings(settings: Settings) -> RedisSettings:
    dsn = settings.redis_dsn or "redis://127.0.0.1:6379/0"
    return RedisSettings.from_dsn(dsn)


class WorkerSettings:
    redis_settings = redis_settings(_settings)
    queue_name = _settings.flywheel_redis_prefix + "queue"
    functions: ClassVar[list[Any]] = [f for m in TASK_MODULES for f in m.FUNCTIONS]
    cron_jobs: ClassVar[list[Any]] = [c for m in TASK_MODULES for c in m.CRONS]
    on_startup = on_startup
    on_shutdown = on_shutdown
    health_check_key = _settings.flywheel_redis_prefix + "worker:health"
    # arq writes its health key every interval with as long an expiry; its default
    # (an hour) lets `arq --check`, the compose healthcheck, call a dead worker healthy.
    health_check_interval = 30
    max_jobs = 20
    job_timeout = 300
