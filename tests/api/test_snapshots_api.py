"""The snapshot admin endpoints through `create_app`, with a real arq worker running the
real snapshot jobs in-process: master key, 202 while no worker answers, create, list,
restore, a damaged file refused, and 503 when the job queue (Redis) is down."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker
from redis.asyncio import Redis
from sqlalchemy import delete

from app.config import Settings
from app.main import create_app
from app.routing.weights import weights_key
from app.store.db import make_engine
from app.store.schema import Snapshot
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served
from workers.context import shutdown, startup
from workers.tasks.snapshots import FUNCTIONS

MASTER = "sk-master-snapshots-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}


@pytest.fixture
def install(
    make_settings: Callable[..., Settings],
    redis_url: str,
    database_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """One installation: the gateway's settings, and the same in the environment for the
    worker (whose startup reads it)."""
    prefix = f"{key_prefix}api{uuid.uuid4().hex[:6]}:"
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "FLYWHEEL_REDIS_PREFIX": prefix,
        "FLYWHEEL_SNAPSHOT_DIR": str(tmp_path),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return make_settings(
        flywheel_redis_prefix=prefix, flywheel_snapshot_dir=tmp_path, flywheel_master_key=MASTER
    )


@pytest.fixture
async def clean_index(database_url: str) -> AsyncIterator[None]:
    """An empty snapshot index before and after (the database is the session's)."""
    engine = make_engine(Settings(_env_file=None, database_url=database_url).database_dsn)  # type: ignore[call-arg]

    async def clear() -> None:
        async with engine.begin() as conn:
            await conn.execute(delete(Snapshot))

    await clear()
    yield
    await clear()
    await engine.dispose()


async def make_worker(redis_url: str, settings: Settings, *, burst: bool) -> Worker:
    pool = await create_pool(
        RedisSettings.from_dsn(redis_url),
        default_queue_name=settings.flywheel_redis_prefix + "queue",
    )
    return Worker(
        functions=FUNCTIONS,
        redis_pool=pool,
        queue_name=settings.flywheel_redis_prefix + "queue",
        on_startup=startup,
        on_shutdown=shutdown,
        burst=burst,
        poll_delay=0.05,
        handle_signals=False,
        keep_result=60,
    )


async def test_admin_snapshots_need_the_master_key(install: Settings) -> None:
    async with Served(create_app(install)) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        calls = [
            client.get("/admin/snapshots"),
            client.post("/admin/snapshots"),
            client.post("/admin/snapshots/snapshot-20260101T000000000000Z/restore"),
            client.get("/admin/jobs/abc"),
        ]
        for resp in await asyncio.gather(*calls):
            assert_openai_error(resp, 401, "authentication_error")
        wrong = await client.get("/admin/snapshots", headers={"authorization": "Bearer nope"})
        assert_openai_error(wrong, 401, "authentication_error")


async def test_queued_until_a_worker_runs_it(
    install: Settings, redis_url: str, clean_index: None
) -> None:
    async with (
        Served(create_app(install)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client,
    ):
        started = time.monotonic()
        queued = await client.post("/admin/snapshots", params={"wait_s": 0.2})
        assert time.monotonic() - started < 2
        assert queued.status_code == 202, queued.text
        job = queued.json()
        assert job["object"] == "job"
        assert (await client.get(job["url"])).json()["status"] == "queued"

        worker = await make_worker(redis_url, install, burst=True)
        await worker.main()  # runs what is queued, then returns
        await worker.close()

        done = (await client.get(job["url"])).json()
        assert done["status"] == "complete"
        snapshot = done["result"]
        listed = (await client.get("/admin/snapshots")).json()
        assert listed["object"] == "list"
        assert [s["id"] for s in listed["data"]] == [snapshot["id"]]
        entry = listed["data"][0]
        assert entry["size_bytes"] == Path(entry["path"]).stat().st_size
        assert entry["checksum"] == snapshot["checksum"]
        assert set(entry["counts"]) >= {"routing_weights", "cache"}
        missing = await client.get("/admin/jobs/no-such-job")
        assert_openai_error(missing, 404, "invalid_request_error")


async def test_create_and_restore_through_a_running_worker(
    install: Settings, redis_url: str, clean_index: None
) -> None:
    redis = Redis.from_url(redis_url)
    key = weights_key(install.flywheel_redis_prefix, "chat")
    await redis.hset(key, mapping={"a": "0.25", "b": "0.75"})
    worker = await make_worker(redis_url, install, burst=False)
    running = asyncio.create_task(worker.async_run())
    try:
        async with (
            Served(create_app(install)) as gw,
            httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=40) as client,
        ):
            slow_ok = {"wait_s": 30}  # a loaded machine may be slow; 202 is not the point
            made = await client.post("/admin/snapshots", params=slow_ok)
            assert made.status_code == 200, made.text
            snapshot = made.json()
            assert snapshot["counts"]["routing_weights"] == 1

            await redis.hset(key, mapping={"a": "1", "b": "0"})
            url = f"/admin/snapshots/{snapshot['id']}/restore"
            restored = await client.post(url, params=slow_ok)
            assert restored.status_code == 200, restored.text
            assert restored.json()["restored"]["routing_weights"] == 1
            assert await redis.hgetall(key) == {b"a": b"0.25", b"b": b"0.75"}

            path = Path(snapshot["path"])
            path.write_bytes(path.read_bytes()[:-30])
            await redis.hset(key, mapping={"a": "1", "b": "0"})
            bad = await client.post(url, params=slow_ok)
            error = assert_openai_error(bad, 400, "invalid_request_error")
            assert error["code"] == "snapshot_corrupt"
            assert "truncated" in error["message"]
            assert await redis.hgetall(key) == {b"a": b"1", b"b": b"0"}  # untouched

            unknown = await client.post(
                "/admin/snapshots/snapshot-20200101T000000000000Z/restore", params=slow_ok
            )
            assert assert_openai_error(unknown, 404, "invalid_request_error")["code"] == (
                "snapshot_not_found"
            )
            odd = await client.post("/admin/snapshots/..%2Fetc/restore")
            assert odd.status_code in (400, 404)
            invalid = await client.post("/admin/snapshots/not-an-id/restore")
            assert assert_openai_error(invalid, 400, "invalid_request_error")["param"] == (
                "snapshot_id"
            )
    finally:
        await worker.close()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await redis.delete(key)
        await redis.aclose()


async def test_queue_down_is_a_clear_503(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0", flywheel_master_key=MASTER)
    async with (
        Served(create_app(settings)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client,
    ):
        started = time.monotonic()
        resp = await client.post("/admin/snapshots")
        assert time.monotonic() - started < 3
        error: dict[str, Any] = assert_openai_error(resp, 503, "server_error")
        assert error["code"] == "queue_unavailable"
        listed = await client.get("/admin/snapshots")  # the index is in the database
        assert listed.status_code == 200
