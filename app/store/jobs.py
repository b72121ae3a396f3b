"""Outcomes of the workers' background jobs, for `/health/detailed`.

One Redis hash (`{prefix}jobs`: job name → JSON) holds each job's last run, last
success, last error and consecutive failures, so the gateway reads them in one round
trip without the database. Workers write it after every run of a tracked job.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, cast

import orjson
from redis.asyncio import Redis


def jobs_key(prefix: str) -> str:
    return prefix + "jobs"


async def note_run(
    redis: Redis,
    prefix: str,
    name: str,
    *,
    ok: bool,
    duration_s: float,
    error: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    key = jobs_key(prefix)
    raw = await cast(Awaitable[bytes | None], redis.hget(key, name))
    previous: dict[str, Any] = orjson.loads(raw) if raw else {}
    now = time.time()
    entry = {
        **previous,
        "last_run_at": now,
        "last_duration_s": round(duration_s, 3),
        "last_ok": ok,
        "runs": int(previous.get("runs", 0)) + 1,
        "failures": int(previous.get("failures", 0)) + (0 if ok else 1),
        "consecutive_failures": 0 if ok else int(previous.get("consecutive_failures", 0)) + 1,
    }
    if ok:
        entry["last_success_at"] = now
        if detail is not None:
            entry["detail"] = detail
    else:
        entry["last_error"] = error
        entry["last_error_at"] = now
    await cast(Awaitable[int], redis.hset(key, name, orjson.dumps(entry).decode()))


async def read_jobs(redis: Redis, prefix: str) -> dict[str, dict[str, Any]]:
    raw = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(jobs_key(prefix)))
    return {name.decode(): orjson.loads(value) for name, value in sorted(raw.items())}
