"""The virtuous cycle's endpoints (master key): status, trigger, runs.

Runs happen in the workers; these read what they stored (database, within a short
timeout: a database that does not answer is a 503, never a hang) and the live routing
weights (Redis). A trigger queues a run unless one is already queued or running, in
which case it answers with that one: the cycle never runs twice at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from arq.jobs import Job, JobStatus
from fastapi import APIRouter, Path, Query
from redis.exceptions import RedisError
from starlette.responses import Response

from app.api.admin import json_response, queue_down
from app.deps import AdminDep, StateDep
from app.errors import NotFoundError, ServiceUnavailableError
from app.observability.tracing import traceparent
from app.routing.weights import weights_key
from app.state import AppState
from app.store.alerts import list_alerts
from app.store.cycle_lock import claim, current_key, next_key, release
from app.store.cycle_runs import get_run, last_run, list_runs
from app.store.db import DB_ERRORS
from app.store.experiments import LIVE, list_experiments

router = APIRouter(prefix="/v1/virtuous-cycle", tags=["virtuous-cycle"], dependencies=[AdminDep])

READ_TIMEOUT_S = 3.0
REDIS_TIMEOUT_S = 1.0
RUN_JOB = "cycle_run"
T = TypeVar("T")


async def read_db(what: str, call: Callable[[], Awaitable[T]]) -> T:
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            return await call()
    except DB_ERRORS as e:
        raise ServiceUnavailableError(
            f"{what} unavailable: the database did not answer ({type(e).__name__})",
            code="database_unavailable",
        ) from e


@router.post("/trigger", status_code=202)
async def trigger(state: StateDep) -> Response:
    """Queue a cycle run now: 202 with its job id, or with the run already queued or
    running (`already_running: true`)."""
    if state.jobs is None or state.redis is None:
        raise queue_down()
    prefix = state.settings.flywheel_redis_prefix
    job_id = f"cycle-{uuid.uuid4().hex[:16]}"
    try:
        async with asyncio.timeout(5.0):
            held = await claim(state.redis, prefix, job_id)
            if held is None:
                job = await state.jobs.enqueue_job(
                    RUN_JOB, job_id, _job_id=job_id, traceparent=traceparent()
                )
                if job is None:  # cannot happen with a fresh id; never leave it held
                    await release(state.redis, prefix, job_id)
                    raise queue_down()
                status = JobStatus.queued
            else:
                job_id = held
                status = await Job(
                    job_id, state.jobs, _queue_name=state.jobs.default_queue_name
                ).status()
    except (RedisError, OSError, TimeoutError) as e:
        raise queue_down(e) from e
    body = {
        "object": "cycle.job",
        "id": job_id,
        "status": "in_progress" if status == JobStatus.not_found else status.value,
        "already_running": held is not None,
        "url": f"/admin/jobs/{job_id}",
    }
    return json_response(body, status=202)


@router.get("/runs")
async def runs(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    before: Annotated[datetime | None, Query(description="runs started before (paging)")] = None,
) -> dict[str, Any]:
    """Runs, newest first (page with `before` = the last one's `started_at`)."""
    if before is not None and before.tzinfo is None:
        before = before.replace(tzinfo=UTC)
    data = await read_db("cycle runs", lambda: list_runs(state.engine, limit, before))
    return {"object": "list", "data": data, "has_more": len(data) == limit}


@router.get("/runs/{run_id}")
async def run(state: StateDep, run_id: Annotated[str, Path(max_length=40)]) -> dict[str, Any]:
    """One run: per route its figures and weights, its findings, actions and the
    outcomes it measured of earlier actions."""
    found = await read_db("cycle runs", lambda: get_run(state.engine, run_id))
    if found is None:
        raise NotFoundError(f"no cycle run {run_id}", code="run_not_found")
    return found


async def _live(state: AppState) -> tuple[dict[str, dict[str, float]], float | None, str | None]:
    """Each adaptive route's published weights, the next scheduled run, the job running
    one; empty when Redis does not answer (the status still shows the rest)."""
    if state.redis is None:
        return {}, None, None
    prefix = state.settings.flywheel_redis_prefix
    adaptive = [n for n, r in state.router.routes.items() if r.strategy == "adaptive"]
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            async with state.redis.pipeline(transaction=False) as pipe:  # one round trip
                for name in adaptive:
                    pipe.hgetall(weights_key(prefix, name))
                pipe.get(next_key(prefix))
                pipe.get(current_key(prefix))
                *raw, due_at, running = await pipe.execute()
    except (RedisError, OSError, TimeoutError):
        return {}, None, None
    try:
        weights = {
            name: {k.decode(): float(v) for k, v in found.items()}
            for name, found in zip(adaptive, raw, strict=True)
        }
        next_run = None if due_at is None else float(due_at)
    except ValueError:  # a hand-edited key: show the rest
        return {}, None, None
    return weights, next_run, None if running is None else running.decode()


@router.get("/status")
async def status(state: StateDep) -> dict[str, Any]:
    """Per route: quality now and its trend, thresholds, routing weights, running
    experiments and open alerts; the last and next run."""
    engine = state.engine
    since = datetime.now(UTC) - timedelta(seconds=state.settings.flywheel_alert_cooldown_s)
    last = await read_db("cycle runs", lambda: last_run(engine, "completed"))
    latest = await read_db("cycle runs", lambda: last_run(engine))
    live = await read_db("experiments", lambda: list_experiments(engine, statuses=LIVE))
    alerts = await read_db("alerts", lambda: list_alerts(engine, limit=500, since=since))
    weights, next_run, running = await _live(state)
    learned = (last or {}).get("routes") or {}
    routes: dict[str, Any] = {}
    for name, config in state.router.routes.items():
        if config.ensemble is not None:
            continue
        figures = learned.get(name) or {}
        routes[name] = {
            "strategy": config.strategy,
            "quality": figures.get("quality"),
            "trend_per_h": figures.get("trend_per_h"),
            "requests": figures.get("requests", 0),
            "thresholds": config.cycle.model_dump(include={"critical", "warning", "target"}),
            "budgets": figures.get("budgets"),
            "weights": weights.get(name) or {d.name: d.weight for d in config.deployments},
            "weights_source": "cycle" if weights.get(name) else "config",
            "deployments": figures.get("deployments", {}),
            "experiments": [e for e in live if e["route"] == name],
            "open_alerts": [a for a in alerts if a["route"] == name],
        }
    return {
        "object": "cycle.status",
        "policy": state.settings.flywheel_policy,
        "interval_s": state.settings.flywheel_cycle_interval_s,
        "last_run": _brief(last),
        "latest_run": _brief(latest),
        "running_job": running,
        "next_run_at": None
        if next_run is None
        else datetime.fromtimestamp(next_run, UTC).isoformat(),
        "routes": routes,
    }


def _brief(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if run is None:
        return None
    keys = ("id", "status", "trigger", "started_at", "finished_at")
    return {k: run.get(k) for k in keys}
