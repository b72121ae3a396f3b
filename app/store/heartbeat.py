"""Worker heartbeats: written by workers, read by `/health/detailed`.

Kept in one Redis hash (worker id → last beat) so the health check is one round trip.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, cast

import orjson
from redis.asyncio import Redis

HEARTBEAT_INTERVAL_S = 10
STALE_AFTER_S = 3 * HEARTBEAT_INTERVAL_S + 5
FORGET_AFTER_S = 3600


def workers_key(prefix: str) -> str:
    return prefix + "workers"


async def write_beat(redis: Redis, prefix: str, worker_id: str, info: dict[str, Any]) -> None:
    now = time.time()
    key = workers_key(prefix)
    payload = orjson.dumps({**info, "last_beat_at": now}).decode()
    await cast(Awaitable[int], redis.hset(key, worker_id, payload))
    # Workers that stopped long ago are forgotten so the hash does not grow forever.
    for wid, raw in (await _hgetall(redis, key)).items():
        if now - float(orjson.loads(raw).get("last_beat_at", 0)) > FORGET_AFTER_S:
            await cast(Awaitable[int], redis.hdel(key, wid.decode()))


async def _hgetall(redis: Redis, key: str) -> dict[bytes, bytes]:
    # redis-py types its commands for sync and async clients at once; this one is async.
    return await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(key))


async def read_beats(redis: Redis, prefix: str) -> list[dict[str, Any]]:
    now = time.time()
    out = []
    for wid, raw in (await _hgetall(redis, workers_key(prefix))).items():
        info = orjson.loads(raw)
        age = now - float(info.get("last_beat_at", 0))
        worker_id = wid.decode() if isinstance(wid, bytes) else str(wid)
        out.append(
            {**info, "worker_id": worker_id, "age_s": round(age, 1), "alive": age <= STALE_AFTER_S}
        )
    return sorted(out, key=lambda w: w["age_s"])
