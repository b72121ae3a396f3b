"""The worker's snapshot jobs, driven as arq drives them (startup(ctx), then the jobs),
against the real Redis and database: the tick takes one when due and never two, warms a
Redis that lost its data (skipping a bad latest file), and restores on demand."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import delete

from app.config import Settings
from app.routing.weights import weights_key
from app.store.db import make_engine
from app.store.jobs import read_jobs
from app.store.schema import Snapshot
from app.store.snapshot_file import SnapshotNotFound
from workers.context import shutdown, startup
from workers.tasks.snapshots import WARMED, snapshot_create, snapshot_restore, snapshot_tick


async def clear_index(database_url: str) -> None:
    engine = make_engine(Settings(_env_file=None, database_url=database_url).database_dsn)  # type: ignore[call-arg]
    async with engine.begin() as conn:
        await conn.execute(delete(Snapshot))
    await engine.dispose()


@pytest.fixture
async def worker(
    redis_url: str,
    database_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[dict[str, Any]]:
    """arq's ctx for a worker of a fresh installation (its own prefix and directory)."""
    prefix = f"{key_prefix}w{uuid.uuid4().hex[:6]}:"
    for name, value in {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "FLYWHEEL_REDIS_PREFIX": prefix,
        "FLYWHEEL_SNAPSHOT_DIR": str(tmp_path),
        "FLYWHEEL_VAR_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    await clear_index(database_url)
    redis = Redis.from_url(redis_url)
    ctx: dict[str, Any] = {"redis": redis, "job_try": 1}
    await startup(ctx)
    try:
        yield ctx
    finally:
        await shutdown(ctx)
        await redis.aclose()
        await clear_index(database_url)


def prefix_of(ctx: dict[str, Any]) -> str:
    settings: Settings = ctx["flywheel"].settings
    return settings.flywheel_redis_prefix


async def lose_everything(redis: Redis, prefix: str) -> None:
    """What a Redis restart without persistence does to this installation."""
    keys = [k async for k in redis.scan_iter(match=prefix + "*")]
    if keys:
        await redis.delete(*keys)


async def test_tick_takes_one_when_due_and_never_two(worker: dict[str, Any]) -> None:
    redis: Redis = worker["redis"]
    p = prefix_of(worker)
    await redis.hset(weights_key(p, "chat"), mapping={"a": "1"})
    first = await snapshot_tick(worker)
    # Learned state was there: the Redis is marked as checked, nothing restored.
    assert first["warm"]["warmed_from"] is None
    assert await redis.exists(p + WARMED)
    assert "created" in first
    second = await snapshot_tick(worker)  # a restart a minute later: not due yet
    assert second == {}
    made = await snapshot_create(worker)  # on demand: always
    assert made["id"] > first["created"]
    assert made["counts"]["routing_weights"] == 1
    jobs = await read_jobs(redis, p)
    assert jobs["snapshot_tick"]["runs"] == 2
    assert jobs["snapshot_create"]["last_ok"] is True


async def test_a_redis_that_lost_its_data_is_warmed_from_the_latest_good_one(
    worker: dict[str, Any],
) -> None:
    redis: Redis = worker["redis"]
    p = prefix_of(worker)
    await redis.hset(weights_key(p, "chat"), mapping={"a": "0.1", "b": "0.9"})
    good = await snapshot_create(worker)
    await redis.hset(weights_key(p, "chat"), mapping={"a": "0.5", "b": "0.5"})
    latest = await snapshot_create(worker)
    Path(latest["path"]).write_bytes(Path(latest["path"]).read_bytes()[:50])  # damaged
    await lose_everything(redis, p)

    tick = await snapshot_tick(worker)
    assert tick["warm"]["warmed_from"] == good["id"]  # the damaged latest was skipped
    assert await redis.hgetall(weights_key(p, "chat")) == {b"a": b"0.1", b"b": b"0.9"}
    # Checked once per Redis lifetime: a later purge of the state is not "repaired".
    await redis.delete(weights_key(p, "chat"))
    assert "warm" not in await snapshot_tick(worker)
    assert not await redis.exists(weights_key(p, "chat"))


async def test_restore_on_demand_and_its_failures(worker: dict[str, Any]) -> None:
    redis: Redis = worker["redis"]
    p = prefix_of(worker)
    await redis.hset(weights_key(p, "chat"), mapping={"a": "0.3"})
    made = await snapshot_create(worker)
    await redis.hset(weights_key(p, "chat"), mapping={"a": "0.9", "b": "0.1"})
    result = await snapshot_restore(worker, made["id"])
    assert result["restored"]["routing_weights"] == 1
    assert await redis.hgetall(weights_key(p, "chat")) == {b"a": b"0.3"}
    with pytest.raises(SnapshotNotFound):  # paths are never taken from the queue
        await snapshot_restore(worker, made["path"])
    jobs = await read_jobs(redis, p)
    assert jobs["snapshot_restore"]["runs"] == 2
    assert jobs["snapshot_restore"]["last_error"] == "SnapshotNotFound"
