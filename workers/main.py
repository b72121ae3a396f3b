"""arq worker settings: `arq workers.main.WorkerSettings` (or `flywheel worker`).

Each task module exports FUNCTIONS (jobs that can be enqueued by name) and CRONS
(its schedule); this module only gathers them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from arq.connections import RedisSettings

from app.config import Settings
from workers.context import shutdown, startup
from workers.tasks import heartbeat

_settings = Settings()
TASK_MODULES = (heartbeat,)


def redis_settings(settings: Settings) -> RedisSettings:
    dsn = settings.redis_dsn or "redis://127.0.0.1:6379/0"
    return RedisSettings.from_dsn(dsn)


class WorkerSettings:
    redis_settings = redis_settings(_settings)
    queue_name = _settings.flywheel_redis_prefix + "queue"
    functions: ClassVar[list[Any]] = [f for m in TASK_MODULES for f in m.FUNCTIONS]
    cron_jobs: ClassVar[list[Any]] = [c for m in TASK_MODULES for c in m.CRONS]
    on_startup = startup
    on_shutdown = shutdown
    health_check_key = _settings.flywheel_redis_prefix + "worker:health"
    max_jobs = 20
    job_timeout = 300
