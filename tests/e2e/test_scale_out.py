"""Scale-out proof: two gateways and two workers on one Redis and one database behave as
one deployment.

All four processes share the same FLYWHEEL_REDIS_PREFIX (fresh for this module), master
key, routes file, Redis and database, as replicas in production do. The module shows:

1. Global rate limits hold: a key with RPM 20, 20 concurrent requests on each gateway
   (each alone within the limit): exactly 20 admitted in all, the rest 429 with
   Retry-After.
2. The L2 cache is shared: an answer fetched through A is a hit (`hit-l2`) on B; the
   upstream saw the question once.
3. Routing weights reach both: weights written where the cycle publishes them steer
   every request on both gateways to one deployment, and a flip is followed by both
   within the refresh interval.
4. A cycle run executes once: triggered on both gateways at once, every trigger answers
   202 with the same job, and exactly one run is recorded (two workers running).
5. Request records land once: N requests over both gateways become exactly N rows with
   the answers' ids, and stay N; both workers consumed the one stream and took a share.
   (Last: it stops the workers to read their shares.)
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from redis import Redis
from sqlalchemy import func, select

from app.cache.keys import route_pattern
from app.config import normalise_database_url
from app.routing.weights import weights_key
from app.store.consolidation import GROUP, stats_key, stream_key
from app.store.cycle_lock import next_key
from app.store.db import make_engine
from app.store.schema import RequestRow
from tests.conftest import create_key
from tests.e2e.conftest import free_port, process_env, start_gateway, start_worker, stop, wait_for
from tests.fakes.openai_fake import openai_fake
from tests.fakes.server import FakeServer

pytestmark = pytest.mark.e2e

MASTER = "sk-master-e2e-scale-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
REFRESH_S = 0.5  # FLYWHEEL_WEIGHTS_REFRESH_S of both gateways
RPM = 20
RECORDS = 200


@dataclass
class Rig:
    a: str
    b: str
    prefix: str
    redis_url: str
    database_url: str
    upstream: FakeServer
    routes: dict[str, str]  # role → route name (unique to this module)
    log: Path
    workers: list[subprocess.Popen[bytes]]
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def gateways(self) -> tuple[str, str]:
        return self.a, self.b


def _mock(name: str) -> dict[str, Any]:
    return {"name": name, "provider": "mock", "model": "mock-1", "mock": {"latency_ms": 2}}


def _routes(names: dict[str, str], upstream: FakeServer) -> dict[str, Any]:
    off = {"mode": "off"}
    return {
        "routes": {
            names["limited"]: {"cache": off, "deployments": [_mock("mock")]},
            names["cached"]: {
                "cache": {"mode": "on", "ttl_s": 300},
                "retries": 0,
                "deployments": [
                    {
                        "name": "fake-openai",
                        "provider": "openai_compatible",
                        "model": "gpt-fake",
                        "api_base": upstream.url + "/v1",
                        "api_key_env": "OPENAI_API_KEY",
                        "input_cost_per_1k": 0.001,
                        "output_cost_per_1k": 0.002,
                    }
                ],
            },
            names["adaptive"]: {
                "strategy": "adaptive",
                "retries": 0,
                "cache": off,
                "deployments": [_mock("left"), _mock("right")],
            },
            names["recorded"]: {"cache": off, "deployments": [_mock("mock")]},
        }
    }


def _wait_workers(url: str, want: int, timeout_s: float = 30.0) -> None:
    """Until `want` workers beat (through Redis) as seen by a gateway."""
    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        resp = httpx.get(url + "/health/detailed", timeout=5)
        alive = sum(w["alive"] for w in resp.json()["workers"]["instances"])
        if alive >= want:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{alive} of {want} workers beating after {timeout_s}s")


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, database_url: str, key_prefix: str
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("scale")
    tag = uuid.uuid4().hex[:6]
    names = {role: f"so-{role}-{tag}" for role in ("limited", "cached", "adaptive", "recorded")}
    prefix = f"{key_prefix}scale{tag}:"
    redis = Redis.from_url(redis_url)
    # No scheduled cycle run in this module: the workers would take one at start-up
    # (none is due yet), and the trigger test counts runs.
    redis.set(next_key(prefix), f"{time.time() + 86400:.3f}")
    with openai_fake() as upstream:
        env = process_env(
            tmp,
            _routes(names, upstream),
            redis_url,
            database_url,
            prefix,
            FLYWHEEL_ENV="staging",
            FLYWHEEL_MASTER_KEY=MASTER,
            FLYWHEEL_REPLICAS="2",
            FLYWHEEL_WEIGHTS_REFRESH_S=str(REFRESH_S),
            FLYWHEEL_CYCLE_INTERVAL_S="3600",
            # The per-process HTTP guard (slowapi, in memory) is not what is under test.
            FLYWHEEL_HTTP_LIMIT_CHAT="100000/minute",
            OPENAI_API_KEY="sk-e2e-openai-0123456789",
        )
        log_path = tmp / "processes.log"
        procs: list[subprocess.Popen[bytes]] = []
        with log_path.open("wb") as log:
            try:
                workers = [start_worker(env, log), start_worker(env, log)]
                procs += workers
                ports = [free_port(), free_port()]
                gateways = [start_gateway(env, p, log, "--no-access-log") for p in ports]
                procs += gateways
                urls = [f"http://127.0.0.1:{p}" for p in ports]
                for url, proc in zip(urls, gateways, strict=True):
                    wait_for(url + "/health", proc=proc)
                _wait_workers(urls[0], 2)
                yield Rig(
                    urls[0],
                    urls[1],
                    prefix,
                    redis_url,
                    database_url,
                    upstream,
                    names,
                    log_path,
                    workers,
                )
            finally:
                for proc in procs:
                    stop(proc)
    keys = list(redis.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis.delete(*keys)
    redis.close()


async def _key(rig: Rig, role: str, **spec: Any) -> str:
    """A virtual key made on gateway A, known to both gateways before it is used (GET
    /v1/models authenticates without counting against any limit)."""
    if role not in rig.keys:
        rig.keys[role] = (await create_key(rig.a, MASTER, name=f"scale-{role}", **spec))["key"]
    key = rig.keys[role]
    async with httpx.AsyncClient(timeout=10) as client:
        for url in rig.gateways:
            resp = await client.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"})
            assert resp.status_code == 200, resp.text
    return key


async def _chat(
    client: httpx.AsyncClient, url: str, key: str, model: str, text: str
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return await client.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    )


async def test_rpm_limit_is_global_across_gateways(rig: Rig) -> None:
    key = await _key(rig, "limited", rpm=RPM)
    # RPM requests to each gateway: a per-process limit would admit all of them.
    n = 2 * RPM
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        answers = await asyncio.gather(
            *(
                _chat(client, rig.gateways[i % 2], key, rig.routes["limited"], f"rpm {i}")
                for i in range(n)
            )
        )
    by_gateway = Counter((r.request.url.port, r.status_code) for r in answers)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert (len(ok), len(refused)) == (RPM, n - RPM), by_gateway
    for r in refused:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Each gateway got RPM requests; together they admitted RPM: one limit, not two.
    assert Counter(r.request.url.port for r in answers) == {
        int(url.rsplit(":", 1)[1]): RPM for url in rig.gateways
    }
    print(f"\nRPM {RPM}, {n} requests: {dict(by_gateway)}")


async def test_l2_cache_is_shared_and_the_upstream_asked_once(rig: Rig, redis_url: str) -> None:
    key = await _key(rig, "cached")
    route = rig.routes["cached"]
    marker = uuid.uuid4().hex
    redis = Redis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(timeout=20) as client:
            first = await _chat(client, rig.a, key, route, f"remember {marker}")
            assert first.status_code == 200, first.text
            assert first.headers["x-flywheel-cache"] == "miss"
            # The L2 write happens after the answer: until it is in Redis, B would miss.
            pattern = route_pattern(rig.prefix, route)
            deadline = time.monotonic() + 5
            while not list(redis.scan_iter(match=pattern, count=1000)):
                assert time.monotonic() < deadline, "the answer never reached L2"
                await asyncio.sleep(0.02)
            second = await _chat(client, rig.b, key, route, f"remember {marker}")
            assert second.status_code == 200, second.text
            assert second.headers["x-flywheel-cache"] == "hit-l2"
            assert second.json()["choices"] == first.json()["choices"]
            # L1 is per process: B now holds it in memory, A had it from the start.
            again = await _chat(client, rig.b, key, route, f"remember {marker}")
            assert again.headers["x-flywheel-cache"] == "hit-l1"
            on_a = await _chat(client, rig.a, key, route, f"remember {marker}")
            assert on_a.headers["x-flywheel-cache"] == "hit-l1"
    finally:
        redis.close()
    assert sum(marker in str(s.body) for s in rig.upstream.seen) == 1


async def _deployments(rig: Rig, key: str, per_gateway: int) -> dict[str, Counter[str]]:
    """Which deployment served each of `per_gateway` requests on each gateway.

    At most 8 at a time: under the deployments' concurrency limit (16 to start with), a
    request never spills over to the other deployment for want of room, so the weights
    alone choose."""
    route = rig.routes["adaptive"]
    out: dict[str, Counter[str]] = {url: Counter() for url in rig.gateways}
    async with httpx.AsyncClient(timeout=20) as client:
        for start in range(0, per_gateway, 8):
            batch = range(start, min(per_gateway, start + 8))
            for url in rig.gateways:
                answers = await asyncio.gather(
                    *(_chat(client, url, key, route, f"w {i}") for i in batch)
                )
                assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
                out[url].update(r.headers["x-flywheel-deployment"] for r in answers)
    return out


async def _followed_by_both(rig: Rig, key: str, want: str, since: float) -> float:
    """Seconds from `since` until every request on both gateways goes to `want`."""
    deadline = since + 10 * REFRESH_S + 5
    while time.monotonic() < deadline:
        served = await _deployments(rig, key, 8)
        if all(set(c) == {want} for c in served.values()):
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    pytest.fail(f"gateways did not all route to {want}: {served}")


async def test_published_weights_steer_both_gateways(rig: Rig, redis_url: str) -> None:
    key = await _key(rig, "adaptive")
    route = rig.routes["adaptive"]
    # Configured weights (equal): both deployments serve on both gateways.
    before = await _deployments(rig, key, 40)
    for url, served in before.items():
        assert set(served) == {"left", "right"}, (url, served)

    redis = Redis.from_url(redis_url)
    try:
        took = {}
        for best, other in (("left", "right"), ("right", "left")):
            # Written as the cycle's `_reweight` publishes them (delete + hset, one
            # transaction).
            with redis.pipeline(transaction=True) as pipe:
                pipe.delete(weights_key(rig.prefix, route))
                pipe.hset(weights_key(rig.prefix, route), mapping={best: "1.0", other: "0.0"})
                pipe.execute()
            written = time.monotonic()
            took[best] = await _followed_by_both(rig, key, best, written)
            # Not a lucky batch: every request on both now goes there.
            settled = await _deployments(rig, key, 40)
            for url, served in settled.items():
                assert served == Counter({best: 40}), (url, served)
            # Within a refresh interval (plus the time of one probe round).
            assert took[best] < REFRESH_S + 1.0, took
        async with httpx.AsyncClient(timeout=10, headers=ADMIN) as client:
            for url in rig.gateways:
                status = (await client.get(url + "/v1/virtuous-cycle/status")).json()
                shown = status["routes"][route]
                assert shown["weights"] == {"right": 1.0, "left": 0.0}, shown
    finally:
        redis.close()
    print(f"\nboth gateways followed published weights after {took} s")


async def test_a_cycle_run_triggered_on_both_gateways_runs_once(rig: Rig) -> None:
    t0 = datetime.now(UTC)
    async with httpx.AsyncClient(timeout=10, headers=ADMIN) as client:
        answers = await asyncio.gather(
            *(client.post(url + "/v1/virtuous-cycle/trigger") for url in rig.gateways * 3)
        )
        assert [r.status_code for r in answers] == [202] * 6, [r.text for r in answers]
        jobs = [r.json() for r in answers]
        assert len({j["id"] for j in jobs}) == 1, jobs
        assert sum(not j["already_running"] for j in jobs) == 1, jobs
        job_id = jobs[0]["id"]
        by_gateway = {r.request.url.port for r in answers}
        assert len(by_gateway) == 2

        deadline = time.monotonic() + 45
        done: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            resp = await client.get(rig.a + "/v1/virtuous-cycle/runs", params={"limit": 50})
            assert resp.status_code == 200, resp.text
            done = [r for r in resp.json()["data"] if r["job_id"] == job_id]
            if done and all(r["status"] != "running" for r in done):
                break
            await asyncio.sleep(0.3)
        assert done, f"no run recorded for {job_id}"
        await asyncio.sleep(2.0)  # a second run would have started by now
        for url in rig.gateways:
            resp = await client.get(url + "/v1/virtuous-cycle/runs", params={"limit": 50})
            runs = resp.json()["data"]
            mine = [r for r in runs if r["job_id"] == job_id]
            assert len(mine) == 1, mine
            assert mine[0]["status"] == "completed", mine
            since = [r for r in runs if datetime.fromisoformat(r["started_at"]) >= t0]
            assert [r["id"] for r in since] == [mine[0]["id"]], since
        status = (await client.get(rig.b + "/v1/virtuous-cycle/status")).json()
        assert status["last_run"]["id"] == mine[0]["id"]
        assert status["running_job"] is None  # released by the run's holder


async def _rows(database_url: str, route: str) -> tuple[int, int, set[str]]:
    engine = make_engine(normalise_database_url(database_url))
    try:
        async with engine.connect() as conn:
            where = RequestRow.route == route
            total = (await conn.execute(select(func.count()).where(where))).scalar_one()
            ids = set((await conn.execute(select(RequestRow.id).where(where))).scalars())
    finally:
        await engine.dispose()
    return int(total), len(ids), ids


async def test_request_records_land_exactly_once(rig: Rig, redis_url: str) -> None:
    key = await _key(rig, "recorded")
    route = rig.routes["recorded"]
    ids: list[str] = []
    queue = iter(range(RECORDS))
    async with httpx.AsyncClient(timeout=20) as client:

        async def sender(n: int) -> None:
            for i in queue:
                resp = await _chat(client, rig.gateways[(i + n) % 2], key, route, f"rec {i}")
                assert resp.status_code == 200, resp.text
                ids.append(resp.json()["id"])

        await asyncio.gather(*(sender(n) for n in range(16)))
    assert len(set(ids)) == RECORDS

    started = time.monotonic()
    while (total := (await _rows(rig.database_url, route))[0]) < RECORDS:
        assert time.monotonic() - started < 30, f"{total} of {RECORDS} rows after 30 s"
        await asyncio.sleep(0.2)
    landed = time.monotonic() - started
    await asyncio.sleep(2.0)  # a duplicate still in flight would show now
    total, distinct, stored = await _rows(rig.database_url, route)
    assert (total, distinct) == (RECORDS, RECORDS)
    assert stored == set(ids)

    redis = Redis.from_url(redis_url)
    try:
        consumers = cast(list[dict[str, Any]], redis.xinfo_consumers(stream_key(rig.prefix), GROUP))
    finally:
        redis.close()
    assert len(consumers) == 2, consumers  # both workers read the one stream
    assert all(c["pending"] == 0 for c in consumers), consumers

    # Both took a share: stopped gracefully, each says how many records it stored, and
    # together they stored what the shared counter says was consolidated in this module.
    # (The last test of the module: the workers are not needed after it.)
    for proc in rig.workers:
        stop(proc)
    shares = [
        int(n)
        for n in re.findall(rb"consolidator stopped after (\d+) records", rig.log.read_bytes())
    ]
    redis = Redis.from_url(redis_url)
    try:
        processed = int(cast(bytes | None, redis.hget(stats_key(rig.prefix), "processed")) or 0)
    finally:
        redis.close()
    assert len(shares) == 2, shares
    assert all(n > 0 for n in shares), shares
    assert sum(shares) == processed, (shares, processed)
    print(f"\n{RECORDS} rows {landed:.1f} s after the last answer; worker shares {shares}")
