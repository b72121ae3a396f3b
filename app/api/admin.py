"""Admin endpoints (master key): the routing state, the cache and the snapshots operators
act on.

Snapshot work runs in a worker (the snapshot directory may exist only on the worker's
host): the endpoint enqueues the job on arq, waits a bounded time for its result and
answers with it, or with 202 and the job's id (`GET /admin/jobs/{id}`) when not done yet.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from arq.jobs import Job, JobStatus
from fastapi import APIRouter, Path, Query
from redis.exceptions import RedisError
from starlette.responses import Response

from app.deps import AdminDep, StateDep
from app.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from app.observability.tracing import traceparent
from app.state import AppState
from app.store.snapshot_file import ID_RE, SnapshotError
from app.store.snapshots import list_snapshots

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.get("/cooldowns")
async def cooldowns(state: StateDep) -> dict[str, Any]:
    """Every deployment's circuit breaker, concurrency limit and Retry-After wait."""
    dispatcher = state.dispatcher
    return {
        "object": "list",
        "data": state.router.snapshot(),
        "hedges": {"started": dispatcher.hedges_started, "won": dispatcher.hedges_won},
    }


@router.post("/cache/prewarm")
async def cache_prewarm(
    state: StateDep, limit: int = Query(default=1000, ge=1, le=100_000)
) -> dict[str, Any]:
    """Load this replica's L1 with the most-hit answers still in L2."""
    return await state.cache.prewarm(limit)


@router.delete("/cache")
async def cache_purge(state: StateDep, route: str | None = None) -> dict[str, Any]:
    """Drop the cached answers of `route` (every route when absent), on every replica."""
    if route is not None:
        state.router.route(route)  # 404 model_not_found for a route that does not exist
    return {"route": route, **await state.cache.purge(route)}


# How long an admin call waits for its job by default, and at most.
JOB_WAIT_S = 10.0
JOB_WAIT_MAX_S = 60.0
POLL_S = 0.1
WaitQuery = Query(default=JOB_WAIT_S, ge=0, le=JOB_WAIT_MAX_S)


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def queue_down(e: BaseException | None = None) -> ServiceUnavailableError:
    why = f" ({type(e).__name__})" if e is not None else " (no Redis configured)"
    return ServiceUnavailableError(
        f"the job queue (Redis) is unavailable{why}; the worker cannot be reached",
        code="queue_unavailable",
    )


def _job_failed(error: BaseException) -> GatewayError:
    """The worker's exception (arq hands it back) as the answer's error."""
    if isinstance(error, SnapshotError):
        if error.code == "snapshot_not_found":
            return NotFoundError(str(error), code=error.code)
        if error.code == "database_unavailable":
            return ServiceUnavailableError(str(error), code=error.code)
        return InvalidRequestError(str(error), code=error.code)
    if isinstance(error, RedisError | OSError):
        return ServiceUnavailableError(
            f"the worker could not reach Redis or the disk: {type(error).__name__}",
            code="worker_dependency_unavailable",
        )
    return GatewayError(f"the job failed: {type(error).__name__}", code="job_failed")


async def _run_job(state: AppState, function: str, wait_s: float, *args: Any) -> Response:
    if state.jobs is None:
        raise queue_down()
    try:
        async with asyncio.timeout(5.0):
            # The request's trace context goes with the job (a keyword the worker's job
            # wrapper takes off): the job's span joins this request's trace.
            job = await state.jobs.enqueue_job(function, *args, traceparent=traceparent())
        if job is None:  # only when a job of the same id exists; ids here are arq's own
            raise GatewayError(f"{function} was not enqueued", code="job_not_enqueued")
        info = await _wait(job, wait_s)
    except (RedisError, OSError, TimeoutError) as e:
        raise queue_down(e) from e
    if info is None:
        pending = {"object": "job", "id": job.job_id, "function": function}
        return json_response({**pending, "url": f"/admin/jobs/{job.job_id}"}, status=202)
    if not info.success:
        raise _job_failed(info.result)
    result = info.result
    return json_response(result if isinstance(result, dict) else {"result": result})


async def _wait(job: Job, wait_s: float) -> Any:
    """The job's outcome (arq's JobResult), or None when not done within `wait_s`.

    Polled here rather than with `Job.result`, which re-raises the worker's exception:
    a Redis error in the worker and one reaching Redis from here must not look alike.
    """
    deadline = time.monotonic() + wait_s
    while True:
        async with asyncio.timeout(5.0):
            info = await job.result_info()
        if info is not None or time.monotonic() >= deadline:
            return info
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


@router.get("/snapshots")
async def snapshots_list(state: StateDep) -> Response:
    """The snapshots in the index, newest first: id, created, size, checksum, counts."""
    try:
        snapshots = await list_snapshots(state.engine)
    except SnapshotError as e:
        raise _job_failed(e) from e
    return json_response({"object": "list", "data": [s.as_dict() for s in snapshots]})


@router.post("/snapshots")
async def snapshots_create(state: StateDep, wait_s: float = WaitQuery) -> Response:
    """Snapshot the learned state now (in a worker)."""
    return await _run_job(state, "snapshot_create", wait_s)


@router.post("/snapshots/{snapshot_id}/restore")
async def snapshots_restore(
    state: StateDep, snapshot_id: str = Path(max_length=64), wait_s: float = WaitQuery
) -> Response:
    """Restore a snapshot into Redis (in a worker); a bad file changes nothing."""
    if not ID_RE.fullmatch(snapshot_id):
        raise InvalidRequestError(
            "snapshot ids look like snapshot-<UTC time>Z (see GET /admin/snapshots)",
            param="snapshot_id",
            code="invalid_value",
        )
    return await _run_job(state, "snapshot_restore", wait_s, snapshot_id)


@router.get("/jobs/{job_id}")
async def job_status(state: StateDep, job_id: str = Path(max_length=128)) -> Response:
    """A job an admin call enqueued: its status and, when complete, its outcome."""
    if state.jobs is None:
        raise queue_down()
    job = Job(job_id, state.jobs, _queue_name=state.jobs.default_queue_name)
    try:
        async with asyncio.timeout(5.0):
            status = await job.status()
            info = await job.result_info() if status == JobStatus.complete else None
    except (RedisError, OSError, TimeoutError) as e:
        raise queue_down(e) from e
    if status == JobStatus.not_found:
        raise NotFoundError(f"no job {job_id} (unknown, or its result has expired)")
    body: dict[str, Any] = {"object": "job", "id": job_id, "status": status.value}
    if info is not None:
        body["function"] = info.function
        if info.success:
            body["result"] = info.result
        else:
            error = _job_failed(info.result)
            body["error"] = error.body()["error"]
    return json_response(body)
