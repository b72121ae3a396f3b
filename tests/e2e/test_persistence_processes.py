"""Request records through real processes: a gateway, arq workers, Redis and the database.

1,000 requests land as exactly 1,000 rows, within seconds; a worker killed with SIGKILL
mid-consolidation loses and duplicates nothing once restarted; a worker that cannot
reach the database keeps the records in Redis until one that can takes them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from app.config import normalise_database_url
from app.store.db import make_engine
from app.store.schema import RequestBody, RequestRow
from tests.e2e.conftest import ROOT, free_port, start_worker, stop, wait_for

REQUESTS = 1000
DEAD_DB = "postgresql://127.0.0.1:1/nowhere"


@dataclass
class Rig:
    url: str
    route: str  # its own, so row counts are this test's alone
    env: dict[str, str]
    log: Path
    gateway: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]

    def worker(self, **env: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            proc = start_worker({**self.env, **env}, log)
        self.workers.append(proc)
        return proc


@pytest.fixture
def rig(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    request: pytest.FixtureRequest,
) -> Iterator[Rig]:
    routes = tmp_path / "routes.yaml"
    route = f"m-{uuid.uuid4().hex[:8]}"
    mock = {"name": "mock", "provider": "mock", "model": "mock-1", "mock": {"latency_ms": 1}}
    kept = {"deployments": [mock], "bodies": {"store": True}}
    routes.write_text(
        yaml.safe_dump({"routes": {route: {"deployments": [mock]}, f"{route}-kept": kept}})
    )
    port = free_port()
    interval = "30" if request.node.get_closest_marker("hold_records") else "0.05"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")},
        "FLYWHEEL_CONFIG": str(routes),
        "FLYWHEEL_VAR_DIR": str(tmp_path),
        "FLYWHEEL_REDIS_PREFIX": f"{key_prefix}p{uuid.uuid4().hex[:6]}:",
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        # Tests marked `hold_records` keep records in the gateway until it stops.
        "FLYWHEEL_RECORDS_INTERVAL_S": interval,
    }
    log = tmp_path / "processes.log"
    with log.open("ab") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    rig = Rig(f"http://127.0.0.1:{port}", route, env, log, gateway, [])
    try:
        wait_for(rig.url + "/health", proc=gateway)
        yield rig
    finally:
        stop(gateway)
        for proc in rig.workers:
            stop(proc)


async def send(rig: Rig, n: int, concurrency: int = 32) -> list[str]:
    """n chat completions; the ids of the answers (all must be 200)."""
    ids: list[str] = []
    queue = iter(range(n))
    async with httpx.AsyncClient(base_url=rig.url, timeout=30) as client:

        async def one_by_one() -> None:
            for i in queue:
                body = {"model": rig.route, "messages": [{"role": "user", "content": f"hi {i}"}]}
                resp = await client.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                ids.append(resp.json()["id"])

        await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
    assert len(set(ids)) == n
    return ids


async def rows(rig: Rig, database_url: str) -> tuple[int, int]:
    """(rows of the rig's route, distinct ids among them)."""
    engine = make_engine(normalise_database_url(database_url))
    try:
        async with engine.connect() as conn:
            where = RequestRow.route == rig.route
            total = (await conn.execute(select(func.count()).where(where))).scalar_one()
            distinct = (
                await conn.execute(select(func.count(func.distinct(RequestRow.id))).where(where))
            ).scalar_one()
    finally:
        await engine.dispose()
    return int(total), int(distinct)


async def wait_rows(rig: Rig, database_url: str, want: int, within_s: float) -> float:
    started = time.monotonic()
    while (await rows(rig, database_url))[0] < want:
        assert time.monotonic() - started < within_s, await rows(rig, database_url)
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def consolidation(url: str) -> dict[str, int]:
    report = httpx.get(url + "/health/detailed", timeout=10).json()["consolidation"]
    assert isinstance(report, dict)
    return report


async def test_a_thousand_requests_become_a_thousand_rows(rig: Rig, database_url: str) -> None:
    rig.worker()
    ids = await send(rig, REQUESTS)
    took = await wait_rows(rig, database_url, REQUESTS, within_s=10)
    assert await rows(rig, database_url) == (REQUESTS, REQUESTS)
    engine = make_engine(normalise_database_url(database_url))
    async with engine.connect() as conn:
        query = select(RequestRow.id).where(RequestRow.route == rig.route)
        stored = set((await conn.execute(query)).scalars())
    await engine.dispose()
    assert stored == set(ids)
    report = consolidation(rig.url)
    assert (report["queue_length"], report["pending"]) == (0, 0)
    assert report["processed"] == REQUESTS
    scraped = httpx.get(rig.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    assert families["flywheel_records_consolidated"].samples[0].value == REQUESTS
    assert families["flywheel_records_queue_length"].samples[0].value == 0
    print(f"1000 rows {took:.1f} s after the burst")


async def test_sigkill_mid_consolidation_loses_and_duplicates_nothing(
    rig: Rig, database_url: str
) -> None:
    ids = await send(rig, REQUESTS)  # no worker yet: all of it waits in the stream
    await asyncio.sleep(0.3)  # the gateway ships every 50 ms
    assert consolidation(rig.url)["queue_length"] > 5
    slow = {
        "FLYWHEEL_CONSOLIDATE_BATCH_SIZE": "1",
        "FLYWHEEL_CONSOLIDATE_DELAY_S": "0.2",
        "FLYWHEEL_CONSOLIDATE_CLAIM_IDLE_S": "1",
    }
    first = rig.worker(**slow)
    await wait_rows(rig, database_url, 1, within_s=20)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    landed, _ = await rows(rig, database_url)
    assert 0 < landed < REQUESTS  # killed mid-way
    rig.worker(FLYWHEEL_CONSOLIDATE_CLAIM_IDLE_S="1")
    await wait_rows(rig, database_url, REQUESTS, within_s=30)
    await asyncio.sleep(1.5)  # anything still in flight would show now
    assert await rows(rig, database_url) == (REQUESTS, REQUESTS)
    report = consolidation(rig.url)
    assert (report["queue_length"], report["pending"]) == (0, 0)
    assert len(ids) == REQUESTS


async def test_records_wait_in_redis_while_the_database_is_unreachable(
    rig: Rig, database_url: str
) -> None:
    blind = rig.worker(DATABASE_URL=DEAD_DB)
    await send(rig, 200)
    await asyncio.sleep(2)
    report = consolidation(rig.url)
    assert report["queue_length"] >= 1
    assert report["processed"] == 0
    assert await rows(rig, database_url) == (0, 0)
    stop(blind)  # a graceful stop: what it held stays pending for the next worker
    rig.worker(FLYWHEEL_CONSOLIDATE_CLAIM_IDLE_S="1")
    await wait_rows(rig, database_url, 200, within_s=20)
    await asyncio.sleep(1)
    assert await rows(rig, database_url) == (200, 200)


@pytest.mark.hold_records
async def test_graceful_gateway_stop_ships_what_it_holds(rig: Rig, database_url: str) -> None:
    rig.worker()
    await send(rig, 300)
    assert consolidation(rig.url)["queue_length"] == 0  # all of it still in the gateway
    rig.gateway.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert rig.gateway.wait(15) in (0, -signal.SIGTERM)
    assert b"Application shutdown complete" in rig.log.read_bytes()
    await wait_rows(rig, database_url, 300, within_s=10)
    assert await rows(rig, database_url) == (300, 300)


async def test_nul_characters_clients_send_are_stored(rig: Rig, database_url: str) -> None:
    """PostgreSQL text holds no NUL: a client's NUL in a message, its `user` or its
    metadata must neither sink the batch it ships in nor be lost from the kept body.
    (SQLite stores NUL, so there only the body's content is checked.)"""
    rig.worker()
    route = f"{rig.route}-kept"
    body = {
        "model": route,
        "messages": [{"role": "user", "content": "before\x00after"}],
        "user": "user\x00one",
        "metadata": {"tag\x00": "value\x00"},
    }
    async with httpx.AsyncClient(base_url=rig.url, timeout=30) as client:
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        ids = [resp.json()["id"]]
    ids += await send(rig, 20)  # in the same batches as the NULs
    await wait_rows(rig, database_url, 20, within_s=20)
    engine = make_engine(normalise_database_url(database_url))
    try:
        deadline = time.monotonic() + 20
        while True:
            async with engine.connect() as conn:
                stored = (
                    await conn.execute(
                        select(RequestBody.request).where(RequestBody.route == route)
                    )
                ).scalar_one_or_none()
                landed = (
                    await conn.execute(select(func.count()).where(RequestRow.id.in_(ids)))
                ).scalar_one()
            if stored is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
    assert landed == 21
    assert stored is not None, "the kept body did not land"
    # JSON text: each NUL kept, escaped.
    for sent in ("before\\u0000after", "user\\u0000one", "tag\\u0000", "value\\u0000"):
        assert sent in stored, sent
