"""Maintenance on the real database: retention in chunks, the follow-up, VACUUM."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from arq.connections import RedisSettings, create_pool
from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.files.storage import FileStorage, new_file_id
from app.store.files import add_file, delete_file, get_file
from app.store.jobs import read_jobs
from app.store.schema import RequestBody, RequestRow
from workers.context import shutdown, startup
from workers.tasks import maintenance
from workers.tasks.maintenance import prune, prune_retention, vacuum


@pytest.fixture
async def tag(engine: AsyncEngine) -> AsyncIterator[str]:
    """This test's id prefix; its rows and bodies are deleted afterwards."""
    prefix = f"mt-{uuid.uuid4().hex[:8]}-"
    yield prefix
    async with engine.begin() as conn:
        await conn.execute(delete(RequestRow).where(RequestRow.id.startswith(prefix)))
        await conn.execute(delete(RequestBody).where(RequestBody.request_id.startswith(prefix)))


async def seed(engine: AsyncEngine, tag: str, created: datetime, n: int, kind: str) -> None:
    """n request rows created at `created`, each with a body expiring a day later."""
    rows: list[dict[str, Any]] = [
        {
            "id": f"{tag}{kind}-{i}",
            "created_at": created,
            "endpoint": "chat.completions",
            "status": 200,
            "latency_ms": 1.0,
        }
        for i in range(n)
    ]
    bodies = [
        {
            "request_id": r["id"],
            "created_at": created,
            "expires_at": created + timedelta(days=1),
            "request": "{}",
        }
        for r in rows
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(RequestRow), rows)
        await conn.execute(insert(RequestBody), bodies)


async def left(engine: AsyncEngine, tag: str) -> tuple[set[str], set[str]]:
    async with engine.connect() as conn:
        rows = await conn.scalars(select(RequestRow.id).where(RequestRow.id.startswith(tag)))
        bodies = await conn.scalars(
            select(RequestBody.request_id).where(RequestBody.request_id.startswith(tag))
        )
        return {r.removeprefix(tag) for r in rows}, {b.removeprefix(tag) for b in bodies}


async def test_prune_deletes_past_retention_in_chunks(
    engine: AsyncEngine, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "PRUNE_CHUNK", 3)
    # A "now" of this test's own, in the past, so no other test's rows are old enough.
    now = datetime(1995, 6, 1, tzinfo=UTC) - timedelta(hours=uuid.uuid4().int % 1000)
    await seed(engine, tag, now - timedelta(days=40), 7, "old")  # past the 30 days
    await seed(engine, tag, now - timedelta(days=2), 2, "recent")  # bodies expired
    await seed(engine, tag, now - timedelta(hours=1), 2, "new")  # everything kept
    done = await prune(engine, now=now, retention_days=30, budget_s=60)
    assert done["requests_deleted"] == 7  # over three chunks of 3
    assert done["bodies_deleted"] == 9  # the old rows' bodies and the recent ones'
    assert done["more"] is False
    rows, bodies = await left(engine, tag)
    assert rows == {"recent-0", "recent-1", "new-0", "new-1"}
    assert bodies == {"new-0", "new-1"}


async def test_prune_stops_at_its_budget_and_enqueues_the_rest(
    engine: AsyncEngine,
    tag: str,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(maintenance, "PRUNE_CHUNK", 2)
    monkeypatch.setattr(maintenance, "PRUNE_BUDGET_S", 0.0)
    prefix = key_prefix + "maint:"
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLYWHEEL_REDIS_PREFIX", prefix)
    monkeypatch.setenv("FLYWHEEL_REQUEST_RETENTION_DAYS", "30")
    await seed(engine, tag, datetime.now(UTC) - timedelta(days=31), 5, "old")
    queue = prefix + "queue"
    redis = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
    ctx: dict[str, Any] = {"redis": redis, "job_try": 1}
    await startup(ctx)
    try:
        done = await prune_retention(ctx)
        assert done["requests_deleted"] == 2  # one chunk, then out of time
        assert done["more"] is True
        assert await redis.zcard(queue) == 1  # the follow-up, deferred
        noted = (await read_jobs(redis, prefix))["prune_retention"]
        assert noted["last_ok"] is True
        assert noted["detail"]["more"] is True
        monkeypatch.setattr(maintenance, "PRUNE_BUDGET_S", 60.0)
        again = await prune_retention(ctx)
        assert again["more"] is False
        rows, _ = await left(engine, tag)
        assert not rows
    finally:
        await shutdown(ctx)
        keys = [k async for k in redis.scan_iter(match=prefix + "*")]
        job_ids = await redis.zrange(queue, 0, -1)
        keys += [b"arq:job:" + j for j in job_ids]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_vacuum_runs_on_this_database(engine: AsyncEngine, tag: str) -> None:
    dialect = engine.dialect.name
    if dialect == "sqlite":
        await seed(engine, tag, datetime(1990, 1, 1, tzinfo=UTC), 300, "bulk")
        async with engine.begin() as conn:
            await conn.execute(delete(RequestRow).where(RequestRow.id.startswith(tag)))
            await conn.execute(delete(RequestBody).where(RequestBody.request_id.startswith(tag)))
            free = await conn.scalar(text("PRAGMA freelist_count"))
        assert free > 0
    done = await vacuum(engine)
    assert done["dialect"] == dialect
    if dialect == "sqlite":
        assert done["statement"] == "VACUUM"
        async with engine.connect() as conn:
            assert await conn.scalar(text("PRAGMA freelist_count")) == 0
        return
    assert done["statement"] == "VACUUM ANALYZE"
    query = text(
        "SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL "
        "FROM pg_stat_user_tables WHERE relname = 'requests'"
    )
    for _ in range(30):  # statistics reach other sessions within a moment
        async with engine.connect() as conn:
            if await conn.scalar(query):
                return
        await asyncio.sleep(0.1)
    raise AssertionError("VACUUM ANALYZE left no trace in pg_stat_user_tables")


async def test_prune_with_nothing_to_do_is_one_cheap_pass(engine: AsyncEngine) -> None:
    done = await prune(engine, now=datetime(1970, 1, 2, tzinfo=UTC), retention_days=1, budget_s=60)
    assert done == {
        "requests_deleted": 0,
        "bodies_deleted": 0,
        "cutoff": datetime(1970, 1, 1, tzinfo=UTC).isoformat(),
        "more": False,
    }


async def test_retention_also_removes_expired_files_and_their_bytes(
    engine: AsyncEngine,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = key_prefix + "maintfiles:"
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLYWHEEL_REDIS_PREFIX", prefix)
    monkeypatch.setenv("FLYWHEEL_VAR_DIR", str(tmp_path))
    storage = FileStorage(tmp_path / "files")
    now = datetime.now(UTC)
    expired, kept = new_file_id(), new_file_id()
    for file_id, expires in ((expired, now - timedelta(hours=1)), (kept, now + timedelta(days=1))):
        await asyncio.to_thread(storage.write, file_id, [b'{"a": 1}\n'])
        await add_file(
            engine,
            file_id=file_id,
            owner=None,
            purpose="batch_output",
            filename="out.jsonl",
            size=9,
            lines=1,
            expires_at=expires,
        )
    redis = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=prefix + "q")
    ctx: dict[str, Any] = {"redis": redis, "job_try": 1}
    await startup(ctx)
    try:
        done = await prune_retention(ctx)
        assert done["files_deleted"] >= 1
        assert await get_file(engine, expired) is None
        assert not storage.path(expired).exists()
        assert await get_file(engine, kept) is not None
        assert storage.path(kept).exists()
    finally:
        await shutdown(ctx)
        await delete_file(engine, kept)
        keys = [k async for k in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
