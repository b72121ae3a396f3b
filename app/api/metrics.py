"""GET /metrics (Prometheus exposition), /metrics/cache, /metrics/history, /metrics/summary.

They hold counts, latencies, costs and names from the routes file, never prompts, keys or
tenants' data. With FLYWHEEL_METRICS_TOKEN unset they are open, as Prometheus endpoints
usually are: keep the gateway's `/metrics*` paths on the private network. With it set,
every one of them wants `Authorization: Bearer <token>` (the master key also does, for
operators), else a 401; Prometheus sends it with `authorization: {credentials: …}` (or
`bearer_token`) in the scrape config. Nothing here writes to the database; the history
and the summary's latest point read it within a short timeout, so a database that is down
gives a 503 (history) or a null point (summary) quickly, never a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.auth.session_revocation import api_session
from app.deps import StateDep
from app.errors import AuthenticationError, ServiceUnavailableError
from app.observability.batch_metrics import batch_exposition, read_batch_stats
from app.observability.metrics import GatewayMetrics
from app.observability.queue_metrics import consolidation_exposition
from app.state import AppState
from app.store.consolidation import consolidation_status
from app.store.db import DB_ERRORS
from app.store.metrics_read import latest_total, read_history

T = TypeVar("T")

HISTORY_TIMEOUT_S = 3.0
SUMMARY_DB_TIMEOUT_S = 1.0
QUEUE_TIMEOUT_S = 0.5


async def require_metrics_token(request: Request, state: StateDep) -> None:
    """With FLYWHEEL_METRICS_TOKEN set: its bearer token, the master key or a dashboard
    session; else 401."""
    token = state.settings.flywheel_metrics_token
    if token is None:
        return
    if await api_session(state, request.headers):
        return  # the operator dashboard, logged in with the master key
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise _unauthorized("missing_api_key")
    presented = given.encode()
    accepted = [token, state.settings.flywheel_master_key]
    # Every secret is compared, so the time taken does not tell which one came close.
    matches = [hmac.compare_digest(presented, s.get_secret_value().encode()) for s in accepted if s]
    if not any(matches):
        raise _unauthorized("invalid_api_key")


def _unauthorized(code: str) -> AuthenticationError:
    # What was presented is never echoed: it would land in scrapers' logs.
    return AuthenticationError(
        "the /metrics endpoints want the metrics token as `Authorization: Bearer <token>`",
        code=code,
        headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
    )


router = APIRouter(tags=["metrics"], dependencies=[Depends(require_metrics_token)])


PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
async def metrics(state: StateDep) -> Response:
    registry = state.metrics
    if isinstance(registry, GatewayMetrics):
        body = await registry.exposition()
    else:
        body = generate_latest(registry)
    shared = await asyncio.gather(_queue(state), _batches(state))
    return Response(body + b"".join(shared), media_type=CONTENT_TYPE_LATEST)


async def _queue(state: AppState) -> bytes:
    """The consolidation queue's metrics; none while Redis does not answer."""
    return await _shared(state, consolidation_status, consolidation_exposition)


async def _batches(state: AppState) -> bytes:
    """Batch execution, as the workers flushed it; none while Redis does not answer."""
    return await _shared(state, read_batch_stats, batch_exposition)


async def _shared(
    state: AppState,
    read: Callable[[Redis, str], Awaitable[T]],
    render: Callable[[T], bytes],
) -> bytes:
    """Metrics every process shares, read from Redis at scrape time (exposed once)."""
    if state.redis is None:
        return b""
    try:
        async with asyncio.timeout(QUEUE_TIMEOUT_S):
            found = await read(state.redis, state.settings.flywheel_redis_prefix)
    except (RedisError, OSError, TimeoutError):
        return b""
    return render(found)


@router.get("/metrics/cache")
async def cache_metrics(state: StateDep) -> dict[str, Any]:
    """Per tier: hits, misses, hit rate and hit latency; L1 size and evictions; L2 health."""
    return state.cache.snapshot()


@router.get("/metrics/history")
async def metrics_history(
    state: StateDep,
    hours: Annotated[int, Query(ge=1, le=24, description="How far back, in hours (1-24)")] = 1,
    series: Annotated[
        bool, Query(description="each route/deployment too (false: all traffic only)")
    ] = True,
    route: Annotated[
        str | None, Query(max_length=200, description="only this route's series (and totals)")
    ] = None,
) -> dict[str, Any]:
    """The metrics points the workers persisted: all traffic, and each route/deployment."""
    try:
        async with asyncio.timeout(HISTORY_TIMEOUT_S):
            history = await read_history(
                state.engine, hours=hours, now=datetime.now(UTC), series=series, route=route
            )
    except DB_ERRORS as e:
        raise ServiceUnavailableError(
            "metrics history is unavailable: the database did not answer",
            code="database_unavailable",
        ) from e
    return {"interval_s": state.settings.flywheel_metrics_interval_s, **history}


async def _latest_point(state: AppState) -> tuple[str, dict[str, Any] | None]:
    try:
        async with asyncio.timeout(SUMMARY_DB_TIMEOUT_S):
            return "ok", await latest_total(state.engine)
    except DB_ERRORS as e:
        return f"down: {type(e).__name__}", None


@router.get("/metrics/summary")
async def metrics_summary(state: StateDep) -> dict[str, Any]:
    """The current state in one cheap read: this process's counters, the newest point."""
    database, latest = await _latest_point(state)
    registry = state.metrics
    counter = registry.requests if isinstance(registry, GatewayMetrics) else None
    multiprocess = isinstance(registry, GatewayMetrics) and registry.multiproc_dir is not None
    return {
        "object": "metrics.summary",
        "uptime_s": round(time.time() - state.started_at, 1),
        # With several gateway processes, each answers for itself; /metrics sums them.
        "process": {"pid": os.getpid(), "multiprocess_metrics": multiprocess},
        "requests": None
        if counter is None
        else {
            "total": counter.total,
            "by_status": counter.by(1),
            "by_cache": counter.by(2),
            "by_route": counter.by(0),
        },
        "latest_point": latest,
        "history": {
            "database": database,
            "interval_s": state.settings.flywheel_metrics_interval_s,
            "points_kept": state.settings.flywheel_metrics_history_points,
        },
        "cache": state.cache.snapshot(),
        "deployments": state.router.snapshot(),
        "hedges": {
            "started": state.dispatcher.hedges_started,
            "won": state.dispatcher.hedges_won,
        },
        "recorder": {
            "pending": state.recorder.pending,
            "dropped": state.recorder.dropped,
            "shipped": state.recorder.shipped,
        },
    }
