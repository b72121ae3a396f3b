"""GET /health (liveness, no I/O) and GET /health/detailed (dependencies, degraded ≠ down)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.deps import StateDep
from app.state import AppState
from app.store.consolidation import consolidation_status
from app.store.db import current_revision
from app.store.heartbeat import read_beats
from app.store.jobs import read_jobs
from app.store.schema import SCHEMA_REVISION

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _redis(state: AppState) -> tuple[dict[str, Any], dict[str, Any]]:
    """Redis's health, and what the workers report through it: heartbeats, the background
    jobs' outcomes and the consolidation queue."""
    if state.redis is None:
        return {"status": "not_configured"}, {}
    started = time.perf_counter()
    try:
        await asyncio.wait_for(state.redis.ping(), CHECK_TIMEOUT_S)
        latency = (time.perf_counter() - started) * 1000
        prefix = state.settings.flywheel_redis_prefix
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            reports = {
                "workers": await read_beats(state.redis, prefix),
                "jobs": await read_jobs(state.redis, prefix),
                "consolidation": await consolidation_status(state.redis, prefix),
                # arq's queue is a sorted set of job ids: the jobs waiting for a worker.
                "queued": await state.redis.zcard(prefix + "queue"),
            }
    except (RedisError, OSError, TimeoutError) as e:
        return {"status": "down", "error": type(e).__name__}, {}
    return {"status": "ok", "latency_ms": round(latency, 2)}, reports


async def _database(state: AppState) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            async with state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            revision = await current_revision(state.engine)
    except (SQLAlchemyError, OSError, TimeoutError) as e:
        return {"status": "down", "error": type(e).__name__}
    status = "ok" if revision == SCHEMA_REVISION else "schema_mismatch"
    return {
        "status": status,
        "revision": revision,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def _deployments(state: AppState) -> list[dict[str, Any]]:
    live = {(d["route"], d["deployment"]): d for d in state.router.snapshot()}
    out = []
    for name, route in state.routes.routes.items():
        for d in route.deployments:
            reason = state.router.disabled.get(f"{name}/{d.name}")
            runtime = live.get((name, d.name), {})
            circuit = runtime.get("circuit", {})
            out.append(
                {
                    "route": name,
                    "deployment": d.name,
                    "provider": d.provider,
                    "enabled": reason is None,
                    "disabled_reason": reason,
                    "circuit": circuit.get("state", "closed")
                    if isinstance(circuit, dict)
                    else None,
                    "concurrency": runtime.get("concurrency"),
                }
            )
    return out


@router.get("/health/detailed")
async def health_detailed(state: StateDep) -> dict[str, Any]:
    (redis, reports), database = await asyncio.gather(_redis(state), _database(state))
    beats: list[dict[str, Any]] = reports.get("workers", [])
    workers_ok = any(w["alive"] for w in beats)
    healthy = redis["status"] == "ok" and database["status"] == "ok" and workers_ok
    return {
        "status": "ok" if healthy else "degraded",
        "uptime_s": round(time.time() - state.started_at, 1),
        "redis": redis,
        "database": database,
        "workers": {
            "status": "ok" if workers_ok else "missing",
            "instances": beats,
            "queue": {
                "name": state.settings.flywheel_redis_prefix + "queue",
                "queued": reports.get("queued"),
            },
        },
        "jobs": reports.get("jobs", {}),
        "consolidation": reports.get("consolidation"),
        "recorder": {
            "pending": state.recorder.pending,
            "dropped": state.recorder.dropped,
            "shipped": state.recorder.shipped,
        },
        "deployments": _deployments(state),
    }
