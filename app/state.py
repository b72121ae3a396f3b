"""Everything with a lifetime, built once in the lifespan and reached by dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from arq.connections import ArqRedis
from prometheus_client import CollectorRegistry
from redis.asyncio import ConnectionPool, Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth.resolver import KeyResolver
from app.cache.service import ResponseCache
from app.config import Settings
from app.cycle.variants import PlanBook
from app.observability.langsmith_runs import LangSmithRuns
from app.observability.redact import Redactors
from app.observability.tracing import Tracing
from app.providers.registry import ProviderRegistry
from app.ratelimit.limiter import Limiter
from app.ratelimit.tokens import TokenCounter
from app.routing.config import RoutesFile
from app.routing.dispatch import Dispatcher
from app.routing.router import Router
from app.store.records import Recorder

if TYPE_CHECKING:  # the API layer imports this module
    from app.api.http_limits import HttpLimits


@dataclass(slots=True)
class AppState:
    settings: Settings
    routes: RoutesFile
    router: Router
    dispatcher: Dispatcher
    providers: ProviderRegistry
    http: aiohttp.ClientSession
    redis: Redis | None
    engine: AsyncEngine
    recorder: Recorder
    started_at: float
    metrics: CollectorRegistry
    cache: ResponseCache
    keys: KeyResolver
    limiter: Limiter
    http_limits: HttpLimits
    tokens: TokenCounter
    tracing: Tracing
    redactors: Redactors
    # The arq queue admin endpoints enqueue worker jobs on, by name (app never imports
    # workers); None without Redis.
    jobs: ArqRedis | None = None
    langsmith: LangSmithRuns | None = None  # None unless LANGSMITH_TRACING and a key
    # Each route's prompt-variant plan, refreshed from Redis (`PlanBook.refresh_forever`).
    variants: PlanBook = field(default_factory=PlanBook)


def make_job_queue(settings: Settings) -> ArqRedis | None:
    """The arq queue the workers consume (`workers.main`: `{prefix}queue`).

    Built without I/O (arq's `create_pool` pings, with retries), so a Redis that is down
    at start-up delays nothing; each enqueue is bounded by the socket timeouts instead.
    """
    dsn = settings.redis_dsn
    if dsn is None:
        return None
    timeout = max(1.0, settings.flywheel_redis_timeout_s)
    pool = ConnectionPool.from_url(
        dsn, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=16
    )
    return ArqRedis(pool, default_queue_name=settings.flywheel_redis_prefix + "queue")
