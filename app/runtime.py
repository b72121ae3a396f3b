"""The gateway's runtime (`AppState`): built and torn down in one place.

The gateway's lifespan opens it for its requests; a worker opens the same for batch
lines (`role="worker"`), so they pass through the very same router, cache, limits,
budgets and request records as live traffic. What belongs to the HTTP front door
stays with the gateway: the per-process default limits, the multiprocess metrics
directory, the access log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from app.api.http_limits import HttpLimits
from app.auth.resolver import KeyService
from app.background import stop_tasks
from app.cache.service import make_cache
from app.config import Settings
from app.observability.access_log import AccessLog
from app.observability.langsmith_metrics import LangSmithCollector
from app.observability.langsmith_runs import make_langsmith
from app.observability.limit_metrics import LimitsCollector
from app.observability.metrics import (
    CountedRecorder,
    RequestCounter,
    make_metrics,
    multiprocess_dir,
)
from app.observability.redact import Redactors
from app.observability.tracing import Tracing
from app.providers.http import make_session
from app.providers.registry import ProviderRegistry
from app.ratelimit.limiter import Limiter
from app.ratelimit.tokens import TokenCounter
from app.routing.config import RoutesFile
from app.routing.dispatch import Dispatcher
from app.routing.live_queue import LiveQueuePublisher, replica_id
from app.routing.router import Router
from app.routing.weights import refresh_forever
from app.state import AppState, make_job_queue
from app.store.db import check_schema, make_engine
from app.store.owners import Owners
from app.store.redis import key, make_redis

Role = Literal["gateway", "worker"]


@asynccontextmanager
async def open_state(
    settings: Settings,
    routes: RoutesFile,
    redactors: Redactors,
    tracing: Tracing,
    *,
    role: Role = "gateway",
    in_flight: Callable[[], int] | None = None,
    max_connections: int | None = None,
) -> AsyncIterator[AppState]:
    gateway = role == "gateway"
    engine = make_engine(settings.database_dsn)
    # Raises on a mismatch (refuse to start); an unreachable database only degrades.
    await check_schema(engine)
    http = make_session(
        max_connections=max_connections or settings.flywheel_upstream_max_connections,
        connect_timeout_s=settings.flywheel_upstream_connect_timeout_s,
        trace_configs=tracing.client_trace_configs(),
    )
    redis = make_redis(settings)
    requests = RequestCounter(routes.routes)  # flywheel_requests_total, as recorded
    access = (
        AccessLog(settings.flywheel_access_log_bodies)
        if settings.flywheel_access_log and gateway
        else None
    )
    if access is not None:
        access.start()
    recorder = CountedRecorder(
        redis,
        key(settings, "requests"),
        capacity=settings.flywheel_records_buffer,
        maxlen=settings.flywheel_records_stream_maxlen,
        interval_s=settings.flywheel_records_interval_s,
        redactors=redactors,
        access=access,
        counter=requests,
        owners=Owners.of(settings),
    )
    recorder.start()
    cache = make_cache(settings)
    cache_task = asyncio.create_task(cache.run_background(), name="cache") if cache.l2 else None
    weights_task = variants_task = live_task = None
    router = Router(routes, settings)
    dispatcher = Dispatcher(router)
    limiter = Limiter(redis, settings.flywheel_redis_prefix, settings.flywheel_replicas)
    # A worker's batch lines are held by their key's own limits (RPM, TPM, budget, in
    # Redis, shared with its live traffic), not by the front door's per-process
    # defaults for keys without an RPM.
    http_limits = HttpLimits(
        settings if gateway else settings.model_copy(update={"flywheel_http_limits": False})
    )
    langsmith = make_langsmith(settings)
    sweep_task = asyncio.create_task(http_limits.sweep_forever(), name="http-limits")
    metrics = make_metrics(
        dispatcher,
        cache,
        requests,
        multiprocess_dir() if gateway else None,
        extra=[
            LimitsCollector(limiter, http_limits),
            *([LangSmithCollector(langsmith)] if langsmith is not None else []),
        ],
        in_flight=in_flight,
    )
    metrics_task = (
        asyncio.create_task(metrics.run_background(), name="metrics")
        if metrics.multiproc_dir
        else None
    )
    key_service = KeyService(settings, redis, engine)
    key_service.start()
    tokens = TokenCounter()
    state = AppState(
        settings=settings,
        routes=routes,
        router=router,
        dispatcher=dispatcher,
        providers=ProviderRegistry(http),
        http=http,
        redis=redis,
        engine=engine,
        recorder=recorder,
        started_at=time.time(),
        metrics=metrics,
        cache=cache,
        keys=key_service.resolver,
        limiter=limiter,
        http_limits=http_limits,
        tokens=tokens,
        tracing=tracing,
        redactors=redactors,
        jobs=make_job_queue(settings) if gateway else None,
        langsmith=langsmith,
    )
    # Not only for adaptive routes: the same tick shares breaker cooldowns (one round
    # trip, and none while every breaker is closed).
    if redis is not None:
        weights_task = asyncio.create_task(
            refresh_forever(
                redis, settings.flywheel_redis_prefix, router, settings.flywheel_weights_refresh_s
            ),
            name="weights",
        )
        # Prompt-variant plans: every replica applies the same plan within a refresh.
        plans = state.variants.refresh_forever(
            redis, settings.flywheel_redis_prefix, router.names, settings.flywheel_weights_refresh_s
        )
        variants_task = asyncio.create_task(plans, name="variants")
        if gateway:  # batch lines in the workers yield to this replica's queued requests
            live = LiveQueuePublisher(redis, settings.flywheel_redis_prefix, router, replica_id())
            live_task = asyncio.create_task(live.run_forever(), name="live-queue")
    try:
        yield state
    finally:
        await stop_tasks(
            weights_task, variants_task, live_task, cache_task, metrics_task, sweep_task
        )
        await key_service.stop()
        await limiter.drain()
        tokens.close()
        await cache.stop()
        await recorder.stop()
        if access is not None:
            await access.stop()
        metrics.close()  # after the last record is counted
        await http.close()
        if redis is not None:
            await redis.aclose()
        if state.jobs is not None:
            await state.jobs.aclose(close_connection_pool=True)
        if gateway:  # a worker's tracing belongs to the worker, which shuts it down
            await asyncio.to_thread(tracing.shutdown)  # flushes queued spans, bounded
        if langsmith is not None:
            await asyncio.to_thread(langsmith.close, 5.0)  # sends what is queued, bounded
        await engine.dispose()
