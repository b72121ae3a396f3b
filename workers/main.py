"""arq worker settings: `arq workers.main.WorkerSettings` (or `flywheel worker`)."""

from __future__ import annotations

from typing import Any, ClassVar

from arq import cron
from arq.connections import RedisSettings

from app.config import Settings
from app.store.heartbeat import HEARTBEAT_INTERVAL_S
from workers.context import shutdown, startup
from workers.tasks.heartbeat import heartbeat

_settings = Settings()


def redis_settings(settings: Settings) -> RedisSettings:
    dsn = settings.redis_dsn or "redis://127.0.0.1:6379/0"
    return RedisSettings.from_dsn(dsn)


class WorkerSettings:
    redis_settings = redis_settings(_settings)
    queue_name = _settings.flywheel_redis_prefix + "queue"
    functions: ClassVar[list[Any]] = [heartbeat]
    cron_jobs: ClassVar[list[Any]] = [
        # One beat per interval across the fleet: it proves the queue is being worked,
        # and names the worker that ran it.
        cron(heartbeat, second=set(range(0, 60, HEARTBEAT_INTERVAL_S)), run_at_startup=True),
    ]
    on_startup = startup
    on_shutdown = shutdown
    health_check_key = _settings.flywheel_redis_prefix + "worker:health"
    max_jobs = 20
    job_timeout = 300
