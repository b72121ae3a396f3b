"""Live traffic before batch work, against the real Redis: a replica's claims appear while
its limiter has waiters and go after; a worker's gate waits while a claim is current
and returns soon after it lapses or is released; an outage reads as clear."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.routing.live_queue import LiveQueueGate, LiveQueuePublisher, live_queue_key
from app.routing.router import Deployment, Router
from tests.conftest import Served, routes_for

MOCK = {"provider": "mock", "model": "mock-a", "mock": {"latency_ms": 1}}


def mock_routes() -> Any:
    return routes_for(
        chat={"deployments": [{"name": "a", **MOCK}, {"name": "b", **MOCK}]},
        other={"deployments": [{"name": "c", **MOCK}]},
    )


def make_router(settings: Settings) -> Router:
    return Router(mock_routes(), settings)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class CountingScript:
    """Counts the calls a publisher or gate makes to its script."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls = 0

    async def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.script(**kwargs)


async def saturate(d: Deployment) -> list[asyncio.Task[bool]]:
    """Every slot taken and two requests waiting for one."""
    while d.limiter.try_acquire():
        pass
    waiters = [asyncio.create_task(d.limiter.acquire(30)) for _ in range(2)]
    await asyncio.sleep(0)
    assert d.limiter.queued == 2
    return waiters


async def drain(d: Deployment, waiters: list[asyncio.Task[bool]]) -> None:
    for _ in waiters:
        d.limiter.release(ok=True)
    assert all(await asyncio.gather(*waiters))
    assert d.limiter.queued == 0


async def test_claims_appear_while_queued_and_go_after(
    redis: Redis, own_prefix: str, make_settings: Callable[..., Settings]
) -> None:
    router = make_router(make_settings())
    pub = LiveQueuePublisher(redis, own_prefix, router, "replica-1")
    counted = CountingScript(pub._script)
    pub._script = counted  # type: ignore[assignment]
    await pub.publish_once()
    assert counted.calls == 0  # nothing queued, nothing claimed: no round trip

    d = router.deployments["chat"][0]
    key = live_queue_key(own_prefix, "chat", "a")
    waiters = await saturate(d)
    await pub.publish_once()
    assert counted.calls == 1
    score = await redis.zscore(key, "replica-1")
    server_s, server_us = await redis.time()
    assert score is not None
    assert 0.5 < score - (server_s + server_us / 1e6) <= 1.0
    assert 0 < await redis.pttl(key) <= 10_000  # the key of a replica that died goes too
    others = [live_queue_key(own_prefix, "chat", "b"), live_queue_key(own_prefix, "other", "c")]
    assert [await redis.exists(k) for k in others] == [0, 0]

    await drain(d, waiters)
    await pub.publish_once()
    assert counted.calls == 2
    assert await redis.zscore(key, "replica-1") is None
    await pub.publish_once()
    assert counted.calls == 2  # released already: quiet again


async def test_a_served_gateway_publishes_its_queue(
    redis: Redis, own_prefix: str, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(flywheel_redis_prefix=own_prefix), mock_routes())
    async with Served(app) as served:
        d = served.state.router.deployments["other"][0]
        key = live_queue_key(own_prefix, "other", "c")
        waiters = await saturate(d)
        gate = LiveQueueGate(redis, own_prefix, poll_s=0.02)
        until = time.monotonic() + 3
        while not await redis.zcard(key) and time.monotonic() < until:
            await asyncio.sleep(0.02)
        assert await redis.zcard(key) == 1
        waiting = asyncio.create_task(gate.wait_clear("other", "c"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the live requests are still queued
        await drain(d, waiters)
        assert 0.3 <= await asyncio.wait_for(waiting, 2) < 1.5
        assert await redis.zcard(key) == 0


@pytest.fixture
async def claim(
    redis: Redis, own_prefix: str, make_settings: Callable[..., Settings]
) -> Callable[..., Awaitable[None]]:
    async def put(ttl_s: float, route: str = "chat", deployment: str = "a") -> None:
        router = make_router(make_settings())
        pub = LiveQueuePublisher(redis, own_prefix, router, f"r-{ttl_s}", ttl_s=ttl_s)
        d = next(x for x in router.deployments[route] if x.name == deployment)
        waiters = await saturate(d)
        await pub.publish_once()  # and never again: a replica that died with requests queued
        for w in waiters:
            w.cancel()

    return put


async def test_gate_waits_until_a_claim_lapses(redis: Redis, own_prefix: str, claim: Any) -> None:
    gate = LiveQueueGate(redis, own_prefix, poll_s=0.02)
    assert await gate.wait_clear("chat", "a") == 0.0
    assert (gate.yields, gate.yield_seconds) == (0, 0.0)
    await claim(0.4)
    await asyncio.sleep(gate.poll_s)  # the answer above is kept for a poll
    waited = await asyncio.wait_for(gate.wait_clear("chat", "a"), 3)
    assert 0.25 <= waited < 0.8
    assert await gate.wait_clear("chat", "b") == 0.0  # another deployment was never queued
    assert gate.yields == 1
    assert gate.yield_seconds == pytest.approx(waited)


async def test_gate_returns_when_a_claim_is_released_or_stop_is_set(
    redis: Redis, own_prefix: str, claim: Any
) -> None:
    gate = LiveQueueGate(redis, own_prefix, poll_s=0.02)
    await claim(30.0)
    waiting = asyncio.create_task(gate.wait_clear("chat", "a"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await redis.delete(live_queue_key(own_prefix, "chat", "a"))
    assert 0.2 <= await asyncio.wait_for(waiting, 1) < 0.5

    await claim(30.0)
    await asyncio.sleep(gate.poll_s)
    stop = asyncio.Event()
    waiting = asyncio.create_task(gate.wait_clear("chat", "a", stop))
    await asyncio.sleep(0.1)
    stop.set()
    assert 0.1 <= await asyncio.wait_for(waiting, 0.5) < 0.3
    assert await gate.wait_clear("chat", "a", stop) == 0.0  # stopping: no wait at all
    assert gate.yields == 2


async def test_many_lines_make_one_call_per_poll(redis: Redis, own_prefix: str) -> None:
    gate = LiveQueueGate(redis, own_prefix, poll_s=0.2)
    counted = CountingScript(gate._script)
    gate._script = counted  # type: ignore[assignment]
    assert set(await asyncio.gather(*(gate.wait_clear("chat", "a") for _ in range(200)))) == {0.0}
    assert counted.calls == 1
    await gate.wait_clear("chat", "a")
    assert counted.calls == 1  # the answer is still fresh
    await asyncio.sleep(0.25)
    await gate.wait_clear("chat", "a")
    assert counted.calls == 2


async def test_an_outage_reads_as_clear_and_is_logged_once(
    own_prefix: str, caplog: pytest.LogCaptureFixture, make_settings: Callable[..., Settings]
) -> None:
    down = Redis.from_url(
        f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=0.25, socket_connect_timeout=0.25
    )
    gate = LiveQueueGate(down, own_prefix, poll_s=0.01)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flywheel.routing"):
        for _ in range(3):
            assert await gate.wait_clear("chat", "a") == 0.0
            await asyncio.sleep(0.02)
    assert time.monotonic() - started < 2
    assert len([r for r in caplog.records if "live queue not readable" in r.message]) == 1

    pub = LiveQueuePublisher(down, own_prefix, make_router(make_settings()), "r")
    d = pub._router.deployments["chat"][0]
    waiters = await saturate(d)
    task = asyncio.create_task(pub.run_forever(0.01))
    with caplog.at_level(logging.WARNING, logger="flywheel.routing"):
        await asyncio.sleep(0.3)
    assert not task.done()  # errors never end the loop
    task.cancel()
    assert len([r for r in caplog.records if "claims not published" in r.message]) == 1
    for w in waiters:
        w.cancel()
    await down.aclose()
