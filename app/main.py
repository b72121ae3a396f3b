"""The FastAPI application: `create_app(settings)` and its lifespan.

`uvicorn app.main:app` builds the app from the environment on first access of `app`
(a module `__getattr__`), so importing this module has no side effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace.export import SpanExporter

from app.api import (
    admin,
    alerts,
    chat,
    cycle,
    datasets,
    embeddings,
    experiments,
    feedback,
    health,
    keys,
    metrics,
    models,
)
from app.api.fastpath import Gateway
from app.api.http_limits import HttpLimits
from app.api.middleware import RequestIdMiddleware
from app.auth.resolver import KeyService
from app.cache.service import make_cache
from app.config import Settings, pii_kinds
from app.errors import install_error_handlers
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
from app.observability.tracing import Tracing, make_tracing
from app.providers.http import make_session
from app.providers.registry import ProviderRegistry
from app.ratelimit.limiter import Limiter
from app.ratelimit.tokens import TokenCounter
from app.routing.config import RoutesFile, load_routes
from app.routing.dispatch import Dispatcher
from app.routing.router import Router
from app.routing.weights import refresh_forever
from app.schemas.chat import ChatCompletionRequest
from app.schemas.embeddings import EmbeddingRequest
from app.state import AppState, make_job_queue
from app.store.db import check_schema, make_engine
from app.store.owners import Owners
from app.store.redis import key, make_redis

log = logging.getLogger("flywheel")
GC_YOUNG_THRESHOLD = 10_000

VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    routes: RoutesFile = app.state.routes
    engine = make_engine(settings.database_dsn)
    # Raises on a mismatch (refuse to start); an unreachable database only degrades.
    await check_schema(engine)
    tracing: Tracing = app.state.tracing
    http = make_session(
        max_connections=settings.flywheel_upstream_max_connections,
        connect_timeout_s=settings.flywheel_upstream_connect_timeout_s,
        trace_configs=tracing.client_trace_configs(),
    )
    redis = make_redis(settings)
    requests = RequestCounter(routes.routes)  # flywheel_requests_total, as recorded
    access = (
        AccessLog(settings.flywheel_access_log_bodies) if settings.flywheel_access_log else None
    )
    if access is not None:
        access.start()
    recorder = CountedRecorder(
        redis,
        key(settings, "requests"),
        capacity=settings.flywheel_records_buffer,
        maxlen=settings.flywheel_records_stream_maxlen,
        interval_s=settings.flywheel_records_interval_s,
        redactors=app.state.redactors,
        access=access,
        counter=requests,
        owners=Owners.of(settings),
    )
    recorder.start()
    cache = make_cache(settings)
    cache_task = asyncio.create_task(cache.run_background(), name="cache") if cache.l2 else None
    weights_task = variants_task = None
    router = Router(routes, settings)
    dispatcher = Dispatcher(router)
    limiter = Limiter(redis, settings.flywheel_redis_prefix, settings.flywheel_replicas)
    http_limits = HttpLimits(settings)
    langsmith = make_langsmith(settings)
    sweep_task = asyncio.create_task(http_limits.sweep_forever(), name="http-limits")
    gateway_metrics = make_metrics(
        dispatcher,
        cache,
        requests,
        multiprocess_dir(),
        extra=[
            LimitsCollector(limiter, http_limits),
            *([LangSmithCollector(langsmith)] if langsmith is not None else []),
        ],
        in_flight=lambda: app.in_flight if isinstance(app, Gateway) else 0,
    )
    metrics_task = (
        asyncio.create_task(gateway_metrics.run_background(), name="metrics")
        if gateway_metrics.multiproc_dir
        else None
    )
    key_service = KeyService(settings, redis, engine)
    key_service.start()
    tokens = TokenCounter()
    app.state.flywheel = AppState(
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
        metrics=gateway_metrics,
        cache=cache,
        keys=key_service.resolver,
        limiter=limiter,
        http_limits=http_limits,
        tokens=tokens,
        tracing=tracing,
        redactors=app.state.redactors,
        jobs=make_job_queue(settings),
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
        plans = app.state.flywheel.variants.refresh_forever(
            redis, settings.flywheel_redis_prefix, router.names, settings.flywheel_weights_refresh_s
        )
        variants_task = asyncio.create_task(plans, name="variants")
    # Objects alive after start-up live for the whole process: freezing them keeps the
    # collector from re-scanning them, which keeps GC pauses off the latency tail. A
    # request allocates a few hundred containers, so the default young-generation
    # threshold (700) ran a collection every request or two; at 10,000 the gateway
    # spent ~8% less CPU per request in `make bench` A/B runs, for a few MB more heap.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    log.info("flywheel ready: %d routes, env=%s", len(routes.routes), settings.flywheel_env)
    try:
        yield
    finally:
        for task in (weights_task, variants_task, cache_task, metrics_task, sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await key_service.stop()
        await limiter.drain()
        tokens.close()
        await cache.stop()
        await recorder.stop()
        if access is not None:
            await access.stop()
        gateway_metrics.close()  # after the last record is counted
        await http.close()
        if redis is not None:
            await redis.aclose()
        if app.state.flywheel.jobs is not None:
            await app.state.flywheel.jobs.aclose(close_connection_pool=True)
        await asyncio.to_thread(tracing.shutdown)  # flushes queued spans, bounded
        if langsmith is not None:
            await asyncio.to_thread(langsmith.close, 5.0)  # sends what is queued, bounded
        await engine.dispose()


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, EmbeddingRequest):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    settings: Settings | None = None,
    routes: RoutesFile | None = None,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    """The app. `span_exporter` turns tracing on with that exporter (tests); otherwise
    it is on when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    settings = settings or Settings()
    # No trailing-slash redirects: Starlette builds their Location from the Host header,
    # and a path is served as spelled or not at all.
    app = Gateway(title="Flywheel", version=VERSION, lifespan=lifespan, redirect_slashes=False)
    app.state.settings = settings
    # Loaded here, not in the lifespan, so a bad routes file fails before serving.
    app.state.routes = routes = routes or load_routes(settings)
    app.state.redactors = redactors = Redactors(
        pii_kinds(settings.flywheel_redact_pii),
        {name: route.redact for name, route in routes.routes.items()},
    )
    tracing = make_tracing(
        settings.otel_service_name, settings.otel_exporter_otlp_endpoint, span_exporter, redactors
    )
    app.state.tracing = tracing
    if tracing.provider is not None:
        # The FastAPI-routed endpoints; the fast path makes its own server span.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing.provider)
    install_error_handlers(app)
    for module in (
        chat,
        embeddings,
        feedback,
        models,
        health,
        admin,
        alerts,
        keys,
        metrics,
        cycle,
        experiments,
        datasets,
    ):
        app.include_router(module.router)
    app.add_middleware(RequestIdMiddleware)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        from app.observability.logging import configure_logging

        settings = Settings()
        configure_logging(settings.flywheel_log_level, json=settings.flywheel_env != "dev")
        return create_app(settings)
    raise AttributeError(name)
