"""Keys' use of their limits (`/admin/keys?usage=true`) through the served gateway: real
requests counted by the limiter show up as requests, tokens and spend against the key's
limits; the answers without `usage` are unchanged; Redis down is `usage: null` with a
reason, never an error; no secret or hash is ever shown."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.ratelimit.periods import period_of
from app.ratelimit.redis_window import limit_keys
from tests.api.test_limits_api import chat
from tests.conftest import Served, create_key, openai_route, routes_for
from tests.e2e.conftest import free_port
from tests.fakes.server import FakeServer

MASTER = "sk-master-usage-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
# The fake answers "hi" with 1 prompt and 3 completion tokens; on "pricey" ($1 per 1k
# tokens either way) a request costs $0.004.
TOKENS_PER_REQUEST = 4
COST_PER_REQUEST = 0.004


@pytest.fixture
async def gw(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer, key_prefix: str
) -> AsyncIterator[Served]:
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        openai_api_key="sk-upstream-0123456789",
        flywheel_redis_prefix=f"{key_prefix}use{uuid.uuid4().hex[:6]}:",
    )
    base = openai_upstream.url
    routes = routes_for(
        r1=openai_route(base),
        pricey=openai_route(base, input_cost_per_1k=1.0, output_cost_per_1k=1.0),
    )
    async with Served(create_app(settings, routes)) as served:
        yield served


async def admin_get(gw: Served, path: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client:
        return await client.get(path, params=params)


async def settled(gw: Served, key_id: str, period: str, nano: int) -> None:
    """Wait for the background settlements to bring the spend to `nano`."""
    redis: Redis = gw.state.redis
    prefix = gw.state.settings.flywheel_redis_prefix
    spent_key = limit_keys(prefix, key_id, period_of(period, time.time())[0])[2]
    for _ in range(200):
        if int(await redis.get(spent_key) or 0) == nano:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"spend never settled at {nano}")


async def test_usage_counts_real_requests_against_the_limits(gw: Served) -> None:
    made = await create_key(gw.url, MASTER, rpm=50, tpm=10_000, budget_usd=1.0, budget_period="day")
    key, key_id = made["key"], made["id"]
    for _ in range(3):
        assert (await chat(gw, key, "pricey", max_tokens=1)).status_code == 200
    await settled(gw, key_id, "day", 3 * 4_000_000)
    one = await admin_get(gw, f"/admin/keys/{key_id}", usage="true")
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["usage_error"] is None
    usage = body["usage"]
    assert usage["requests_per_min"] == {"used": 3, "limit": 50}
    assert usage["tokens_per_min"] == {"used": 3 * TOKENS_PER_REQUEST, "limit": 10_000}
    budget = usage["budget"]
    assert budget["spent_usd"] == pytest.approx(3 * COST_PER_REQUEST)
    assert (budget["limit_usd"], budget["period"]) == (1.0, "day")
    resets = datetime.fromisoformat(budget["resets_at"])
    assert resets == datetime.fromtimestamp(period_of("day", time.time())[1] or 0, UTC)
    listed = await admin_get(gw, "/admin/keys", usage="true", limit=1000)
    assert listed.json()["usage_error"] is None
    mine = [k for k in listed.json()["data"] if k["id"] == key_id]
    assert [k["usage"] for k in mine] == [usage]
    for resp in (one, listed):
        assert key not in resp.text
        assert hashlib.sha256(key.encode()).hexdigest() not in resp.text
        assert "key_hash" not in resp.text


async def test_keys_without_limits_have_no_counters(gw: Served) -> None:
    made = await create_key(gw.url, MASTER)
    assert (await chat(gw, made["key"])).status_code == 200  # the endpoint default: no Redis
    usage = (await admin_get(gw, f"/admin/keys/{made['id']}", usage="true")).json()["usage"]
    assert usage == {
        "requests_per_min": {"used": 0, "limit": None},
        "tokens_per_min": {"used": 0, "limit": None},
        "budget": {"spent_usd": 0.0, "limit_usd": None, "period": None, "resets_at": None},
    }


async def test_only_the_last_minute_counts_and_nothing_is_deleted(gw: Served) -> None:
    made = await create_key(gw.url, MASTER, rpm=10, budget_usd=5.0)  # budget_period "total"
    key_id = made["id"]
    redis: Redis = gw.state.redis
    req, _, usd = limit_keys(gw.state.settings.flywheel_redis_prefix, key_id, "total")
    await redis.set(usd, 1_500_000_000)
    for _ in range(5):  # the window moves each second: read within the second it was set
        now_sec = int((await redis.time())[0])
        # A bucket from two minutes ago (the reserve script prunes only when it runs),
        # the oldest second still in the window, and the current one.
        old = {now_sec - 120: 7, now_sec - 59: 2, now_sec: 1}
        await redis.delete(req)
        await redis.hset(req, mapping=old)  # type: ignore[misc]
        usage = (await admin_get(gw, f"/admin/keys/{key_id}", usage="true")).json()["usage"]
        if int((await redis.time())[0]) == now_sec:
            break
    assert usage["requests_per_min"] == {"used": 3, "limit": 10}
    assert usage["budget"] == {
        "spent_usd": 1.5,
        "limit_usd": 5.0,
        "period": "total",
        "resets_at": None,
    }
    assert len(await redis.hgetall(req)) == 3  # type: ignore[misc]  # read, never pruned


async def test_answers_without_usage_are_unchanged(gw: Served) -> None:
    made = await create_key(gw.url, MASTER, rpm=5)
    one = (await admin_get(gw, f"/admin/keys/{made['id']}")).json()
    listed = (await admin_get(gw, "/admin/keys")).json()
    assert "usage" not in one
    assert "usage_error" not in one
    assert set(listed) == {"object", "data", "has_more", "last_id"}
    assert all("usage" not in k for k in listed["data"])
    plain = (await admin_get(gw, f"/admin/keys/{made['id']}", usage="false")).json()
    assert plain == one


async def test_redis_down_is_usage_null_not_an_error(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    dead = free_port()  # a port nothing listens on: Redis is "down" throughout
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        openai_api_key="sk-upstream-0123456789",
        redis_url=f"redis://127.0.0.1:{dead}/0",
    )
    routes = routes_for(r1=openai_route(openai_upstream.url))
    async with Served(create_app(settings, routes)) as down:
        made = await create_key(down.url, MASTER, rpm=10, tpm=1000)
        assert (await chat(down, made["key"])).status_code == 200  # limited locally
        started = time.monotonic()
        one = await admin_get(down, f"/admin/keys/{made['id']}", usage="true")
        listed = await admin_get(down, "/admin/keys", usage="true")
        assert time.monotonic() - started < 3  # bounded, never a hang
    assert one.status_code == listed.status_code == 200
    assert (one.json()["usage"], one.json()["usage_error"]) == (None, "redis_unavailable")
    assert listed.json()["usage_error"] == "redis_unavailable"
    assert listed.json()["data"]
    assert all(k["usage"] is None for k in listed.json()["data"])
    assert made["key"] not in one.text + listed.text
