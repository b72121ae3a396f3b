"""Batch execution in GET /metrics: what workers' `BatchStats` flush is what a gateway
exposes, gauges only of workers that flushed lately, and a failed flush loses nothing
and counts nothing twice."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.config import Settings
from app.main import create_app
from app.observability.batch_metrics import BatchStats, stats_key, workers_key
from tests.api.test_metrics_api import key, samples
from tests.conftest import Served, routes_for

CHAT = "/v1/chat/completions"


@dataclass
class Gate:
    yields: int = 0
    yield_seconds: float = 0.0


@pytest.fixture
async def served(make_settings: Callable[..., Settings], own_prefix: str) -> AsyncIterator[Served]:
    routes = routes_for(demo={"deployments": [{"name": "m", "provider": "mock", "model": "m"}]})
    async with Served(create_app(make_settings(flywheel_redis_prefix=own_prefix), routes)) as s:
        yield s


async def scrape(served: Served) -> str:
    async with httpx.AsyncClient(base_url=served.url) as client:
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def one(text: str, name: str, **labels: str) -> float:
    return samples(text, name).get(key(**labels), 0.0)


async def test_flushed_stats_show_in_metrics(served: Served, redis: Redis, own_prefix: str) -> None:
    before = await scrape(served)
    assert one(before, "flywheel_batch_yields_total") == 0
    assert one(before, "flywheel_batch_lines_in_flight") == 0

    gate = Gate()
    w1 = BatchStats(redis, own_prefix, "worker-1", gate)
    w2 = BatchStats(redis, own_prefix, "worker-2")
    for _ in range(3):
        w1.line_finished(CHAT, ok=True)
    w1.line_finished(CHAT, ok=False)
    w2.line_finished("/v1/embeddings", ok=True)
    w2.line_finished("/v1/made-up", ok=True)  # label values stay bounded
    w1.line_retried(2)
    w1.batch_finished("completed")
    w2.batch_finished("cancelled")
    w2.batch_finished("weird")
    gate.yields, gate.yield_seconds = 4, 1.5
    w1.lines_in_flight, w1.batches_active = 5, 2
    w2.lines_in_flight, w2.batches_active = 1, 1
    assert await w1.flush()
    assert await w2.flush()
    gate.yields, gate.yield_seconds = 5, 2.0  # one more yield, counted once
    assert await w1.flush()
    # A worker that stopped flushing a while ago: its gauges no longer count.
    stale = {"in_flight": 100, "active": 100, "ts": time.time() - 60}
    await redis.hset(workers_key(own_prefix), "gone", orjson.dumps(stale).decode())  # type: ignore[misc]

    text = await scrape(served)
    assert one(text, "flywheel_batch_lines_total", endpoint=CHAT, outcome="completed") == 3
    assert one(text, "flywheel_batch_lines_total", endpoint=CHAT, outcome="failed") == 1
    lines = samples(text, "flywheel_batch_lines_total")
    assert lines[key(endpoint="/v1/embeddings", outcome="completed")] == 1
    assert lines[key(endpoint="other", outcome="completed")] == 1
    assert len(lines) == 4
    assert one(text, "flywheel_batch_line_retries_total") == 2
    assert one(text, "flywheel_batch_yields_total") == 5
    assert one(text, "flywheel_batch_yield_seconds_total") == 2.0
    finished = samples(text, "flywheel_batch_finished_total")
    assert finished == {
        key(status="completed"): 1,
        key(status="cancelled"): 1,
        key(status="other"): 1,
    }
    assert one(text, "flywheel_batch_lines_in_flight") == 6
    assert one(text, "flywheel_batch_active") == 3
    # Exposed once (read from Redis), however many gateway processes there are.
    assert text.count("# TYPE flywheel_batch_active gauge") == 1

    await w2.close()  # a worker that stops takes its gauges with it
    text = await scrape(served)
    assert one(text, "flywheel_batch_lines_in_flight") == 5


async def counted(redis: Redis, prefix: str, field: str) -> float:
    value = await redis.hget(stats_key(prefix), field)  # type: ignore[misc]
    return float(value) if value is not None else 0.0


class Flaky:
    """The flush script, failing as told: before it runs, or after (the reply lost)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.plan: list[str] = []

    async def __call__(self, **kwargs: Any) -> Any:
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "down":
            raise RedisConnectionError("connection refused")
        result = await self.script(**kwargs)
        if step == "lost":
            raise TimeoutError
        return result


async def test_a_failed_flush_loses_nothing_and_counts_nothing_twice(
    served: Served, redis: Redis, own_prefix: str
) -> None:
    stats = BatchStats(redis, own_prefix, "worker-f")
    flaky = Flaky(stats._script)
    stats._script = flaky  # type: ignore[assignment]

    stats.line_finished(CHAT, ok=True)
    flaky.plan = ["down", "down"]
    assert not await stats.flush()
    stats.line_finished(CHAT, ok=True)  # counted while the first two wait
    assert not await stats.flush()
    assert await redis.exists(stats_key(own_prefix)) == 0

    flaky.plan = ["lost"]  # applied, but the worker never hears so
    assert not await stats.flush()
    field = f"lines|{CHAT}|completed"
    assert await counted(redis, own_prefix, field) == 1
    assert await stats.flush()  # sent again: the same flush, not applied twice
    assert await counted(redis, own_prefix, field) == 1
    assert await stats.flush()  # then what was counted meanwhile
    stats.line_finished(CHAT, ok=True)
    assert await stats.flush()

    text = await scrape(served)
    assert one(text, "flywheel_batch_lines_total", endpoint=CHAT, outcome="completed") == 3
