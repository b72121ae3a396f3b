"""The cache when Redis goes away: a redis-server of this test's own, stopped mid-test.

Requests keep succeeding, L1 keeps hitting, nothing waits longer than the L2 timeout,
one warning is logged for the outage, and L2 resumes by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.embedded import redis_server_binary
from app.main import create_app
from tests.api.test_cache_api import body, cache_routes, calls, post
from tests.conftest import Served
from tests.fakes.server import FakeServer


class OwnRedis:
    def __init__(self, tmp: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.tmp)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until = time.monotonic() + 10
        while time.monotonic() < until:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_outage_degrades_to_l1_and_recovers(
    make_settings: Callable[..., Settings],
    openai_upstream: FakeServer,
    own_redis: OwnRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        openai_api_key="sk-test-secret-0123456789",
        redis_url=own_redis.url,
        flywheel_cache_redis_timeout_s=0.1,
    )
    warm, cold = uuid.uuid4().hex, uuid.uuid4().hex
    async with Served(create_app(settings, cache_routes(openai_upstream.url))) as gw:
        cache = gw.state.cache
        assert (await post(gw, body(warm))).headers["x-flywheel-cache"] == "miss"
        own_redis.stop()
        caplog.set_level(logging.WARNING, logger="flywheel.cache")
        for i in range(10):
            started = time.perf_counter()
            hit = await post(gw, body(warm))
            assert hit.status_code == 200
            assert hit.headers["x-flywheel-cache"] == "hit-l1"
            fresh = await post(gw, body(f"{cold}-{i}"))
            assert fresh.status_code == 200
            # An L2 miss while Redis is gone costs at most about one L2 timeout.
            assert time.perf_counter() - started < 2.0
        assert not cache.l2.up
        assert cache.l2.failures >= 1
        outage_warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_warnings) == 1
        # The answers filled during the outage live in L1.
        assert (await post(gw, body(f"{cold}-3"))).headers["x-flywheel-cache"] == "hit-l1"

        own_redis.start()
        await asyncio.sleep(cache.l2.retry_s + 0.1)
        back = uuid.uuid4().hex
        assert (await post(gw, body(back))).headers["x-flywheel-cache"] == "miss"
        for _ in range(50):
            if cache.l2.up and cache.stats.l2_writes >= 1:
                break
            await asyncio.sleep(0.05)
        assert cache.l2.up
        assert any("back" in r.getMessage() for r in caplog.records)
        async with httpx.AsyncClient(base_url=gw.url) as client:
            stats = (await client.get("/metrics/cache")).json()
        assert stats["l2"]["up"] is True
        assert stats["l2"]["outages"] == 1
    # The answer written after the recovery is in the restarted Redis for a new process.
    async with Served(create_app(settings, cache_routes(openai_upstream.url))) as again:
        assert (await post(again, body(back))).headers["x-flywheel-cache"] == "hit-l2"
    assert calls(openai_upstream, warm) == 1
