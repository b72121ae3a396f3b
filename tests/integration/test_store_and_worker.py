"""The real Redis and database: request records, heartbeats, the schema check, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from app.config import Settings
from app.main import create_app
from app.store.db import SchemaMismatchError, check_schema, make_engine
from app.store.heartbeat import read_beats
from app.store.records import Recorder, RequestRecord, decode_entries
from app.store.schema import WorkerHeartbeat
from tests.conftest import Served
from workers.context import shutdown, startup
from workers.tasks.heartbeat import heartbeat


def record(rid: str) -> RequestRecord:
    return RequestRecord(
        request_id=rid,
        endpoint="chat.completions",
        route="r",
        deployment="d",
        provider="mock",
        model="m",
        status=200,
        stream=False,
        started_at=time.time(),
        latency_ms=1.0,
    )


async def test_recorder_ships_to_the_stream(redis_url: str, key_prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    stream = key_prefix + "records-test"
    recorder = Recorder(redis, stream)
    recorder.start()
    for i in range(50):
        recorder.record(record(f"r{i}"))
    await recorder.stop()
    entries = await redis.xrange(stream)
    assert len(entries) < 50  # batched: one entry per interval, not per request
    assert [r["request_id"] for r in decode_entries(entries)] == [f"r{i}" for i in range(50)]
    assert recorder.shipped == 50
    await redis.aclose()


async def test_recorder_buffers_bounded_when_redis_is_down() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.1)
    recorder = Recorder(dead, "x", capacity=10, interval_s=0.01)
    recorder.start()
    started = time.perf_counter()
    for i in range(25):
        recorder.record(record(f"r{i}"))
    assert time.perf_counter() - started < 0.05  # never waits on Redis
    await asyncio.sleep(0.3)
    assert recorder.pending == 10  # the newest are kept, in order
    assert recorder.dropped == 15
    assert recorder.shipped == 0
    await recorder.stop(drain_timeout_s=0.1)
    await dead.aclose()


async def test_heartbeat_job_writes_redis_and_database(
    redis_url: str, database_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    prefix = key_prefix + "hb:"  # its own, so other tests see no worker
    monkeypatch.setenv("FLYWHEEL_REDIS_PREFIX", prefix)
    redis = Redis.from_url(redis_url)
    ctx: dict[str, object] = {"redis": redis}
    await startup(ctx)
    try:
        assert await heartbeat(ctx) == 1
        assert await heartbeat(ctx) == 2
        beats = await read_beats(redis, prefix)
        mine = [b for b in beats if b["beats"] == 2]
        assert mine
        assert mine[0]["alive"] is True
        engine = make_engine(Settings(_env_file=None, database_url=database_url).database_dsn)  # type: ignore[call-arg]
        async with engine.connect() as conn:
            rows = (await conn.execute(select(WorkerHeartbeat))).all()
        await engine.dispose()
        assert any(r.worker_id == mine[0]["worker_id"] and r.beats == 2 for r in rows)
    finally:
        await shutdown(ctx)
        await redis.aclose()


async def test_schema_check(tmp_path: Path, database_url: str) -> None:
    migrated = make_engine(Settings(_env_file=None, database_url=database_url).database_dsn)  # type: ignore[call-arg]
    assert await check_schema(migrated) is True
    await migrated.dispose()
    empty = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SchemaMismatchError, match="flywheel migrate"):
        await check_schema(empty)
    await empty.dispose()
    unreachable = make_engine("postgresql+asyncpg://127.0.0.1:1/none")
    assert await check_schema(unreachable) is False
    await unreachable.dispose()


async def test_app_refuses_to_start_on_schema_mismatch(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    app = create_app(settings)
    with pytest.raises(SchemaMismatchError):
        async with app.router.lifespan_context(app):
            pass


async def test_redis_and_database_down_degrade_never_fail(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        redis_url="redis://127.0.0.1:1/0", database_url="postgresql://127.0.0.1:1/none"
    )
    async with Served(create_app(settings)) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        started = time.perf_counter()
        for _ in range(5):
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200
        assert time.perf_counter() - started < 3
        detail = (await client.get("/health/detailed")).json()
    assert detail["status"] == "degraded"
    assert detail["redis"]["status"] == "down"
    assert detail["database"]["status"] == "down"
