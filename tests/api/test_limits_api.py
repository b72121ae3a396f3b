"""Per-key limits through the served gateway: OpenAI's `x-ratelimit-*` headers on every
response (JSON, stream, cache hit, error), 429s with Retry-After and OpenAI's error
bodies, the per-key default for keys without an RPM, budgets refused with
`insufficient_quota`, a route that fails closed without Redis, and the limiter counted
in /metrics."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.ratelimit.periods import period_of
from tests.conftest import Served, create_key, openai_route, routes_for
from tests.fakes.server import FakeServer

MASTER = "sk-master-limits-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}


@pytest.fixture
async def gw(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer, key_prefix: str
) -> AsyncIterator[Served]:
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        openai_api_key="sk-upstream-0123456789",
        flywheel_redis_prefix=f"{key_prefix}lim{uuid.uuid4().hex[:6]}:",
        flywheel_http_limit_chat="4/minute",
    )
    base = openai_upstream.url
    routes = routes_for(
        r1=openai_route(base),
        cached=openai_route(base) | {"cache": {"mode": "on", "ttl_s": 60}},
        fails=openai_route(base, "fail-500") | {"retries": 0},
        pricey=openai_route(base, input_cost_per_1k=1.0, output_cost_per_1k=1.0),
    )
    async with Served(create_app(settings, routes)) as served:
        yield served


async def new_key_body(gw: Served, **spec: Any) -> dict[str, Any]:
    return await create_key(gw.url, MASTER, **spec)


async def new_key(gw: Served, **spec: Any) -> str:
    secret: str = (await new_key_body(gw, **spec))["key"]
    return secret


async def chat(gw: Served, key: str, model: str = "r1", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        return await client.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )


def limits_of(resp: httpx.Response, kind: str) -> tuple[int, int, str]:
    h = resp.headers
    return (
        int(h[f"x-ratelimit-limit-{kind}"]),
        int(h[f"x-ratelimit-remaining-{kind}"]),
        h[f"x-ratelimit-reset-{kind}"],
    )


async def test_rpm_headers_and_429(gw: Served) -> None:
    key = await new_key(gw, rpm=3, tpm=100_000)
    answers = [await chat(gw, key) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [limits_of(r, "requests")[:2] for r in answers] == [(3, 2), (3, 1), (3, 0), (3, 0)]
    assert limits_of(answers[0], "tokens")[0] == 100_000
    assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = answers[3]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert int(refused.headers["retry-after-ms"]) <= 60_000
    assert "x-request-id" in refused.headers


async def test_every_kind_of_response_carries_the_headers(gw: Served) -> None:
    key = await new_key(gw, rpm=100, tpm=100_000)
    streamed = await chat(gw, key, stream=True)
    assert streamed.status_code == 200
    assert "[DONE]" in streamed.text
    assert limits_of(streamed, "requests")[0] == 100
    miss, hit = await chat(gw, key, "cached"), await chat(gw, key, "cached")
    assert hit.headers["x-flywheel-cache"] == "hit-l1"
    assert limits_of(miss, "requests")[1] - 1 == limits_of(hit, "requests")[1]
    failed = await chat(gw, key, "fails")
    assert failed.status_code == 502
    assert limits_of(failed, "tokens")[0] == 100_000


async def test_keys_without_rpm_get_the_endpoint_default(gw: Served) -> None:
    key = await new_key(gw)  # FLYWHEEL_HTTP_LIMIT_CHAT=4/minute in this gateway
    answers = [await chat(gw, key) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 4 + [429]
    assert [limits_of(r, "requests")[1] for r in answers[:4]] == [3, 2, 1, 0]
    assert "x-ratelimit-limit-tokens" not in answers[0].headers  # the key has no TPM
    assert answers[4].headers["retry-after"].isdigit()
    assert limits_of(answers[4], "requests")[:2] == (4, 0)
    assert (await chat(gw, MASTER)).status_code == 200  # the operator is not limited


async def test_budget_reserved_settled_and_refused(gw: Served, redis: Redis) -> None:
    # "pricey" costs $1 per 1k tokens either way; the fake answers "hi" with 1 prompt and
    # 3 completion tokens: $0.004 a request. The reservation is the estimate (8 prompt
    # tokens by tiktoken with OpenAI's framing, plus max_tokens 1): $0.009.
    made = await new_key_body(gw, rpm=1000, budget_usd=0.01, budget_period="day")
    key, key_id = made["key"], made["id"]
    prefix = gw.state.settings.flywheel_redis_prefix
    period_id, _ = period_of("day", time.time())
    spent_key = f"{prefix}rl:{{{key_id}}}:usd:{period_id}"
    statuses = []
    for n in range(1, 5):
        resp = await chat(gw, key, "pricey", max_tokens=1)
        statuses.append(resp.status_code)
        if resp.status_code != 200:
            break
        for _ in range(100):  # settled in the background, off the response's path
            if int(await redis.get(spent_key) or 0) == n * 4_000_000:
                break
            await asyncio.sleep(0.01)
        assert int(await redis.get(spent_key) or 0) == n * 4_000_000  # the real cost
    assert statuses == [200, 200, 200, 429]  # $0.012 recorded >= $0.01: spent
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert 1 <= int(resp.headers["retry-after"]) <= 86_400  # until the day ends (UTC)


async def test_too_large_for_the_tpm_is_refused_without_retry_after(gw: Served) -> None:
    key = await new_key(gw, tpm=100)
    refused = await chat(gw, key, max_tokens=500)
    assert refused.status_code == 429
    assert "Request too large" in refused.json()["error"]["message"]
    assert "retry-after" not in refused.headers


async def test_limiter_in_metrics(gw: Served) -> None:
    key = await new_key(gw, rpm=1)
    assert [(await chat(gw, key)).status_code for _ in range(2)] == [200, 429]
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    assert 'flywheel_limiter_decisions_total{result="allowed"}' in text
    assert 'flywheel_limiter_decisions_total{result="requests"}' in text
    assert "flywheel_limiter_redis_up 1.0" in text


async def test_without_redis_each_replica_takes_its_share_or_the_route_fails_closed(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    with socket.socket() as s:  # a port nothing listens on: Redis is "down" throughout
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        openai_api_key="sk-upstream-0123456789",
        redis_url=f"redis://127.0.0.1:{dead}/0",
        flywheel_replicas=2,
    )
    base = openai_upstream.url
    routes = routes_for(
        r1=openai_route(base),
        strict=openai_route(base) | {"limits": {"on_redis_down": "closed"}},
    )
    async with Served(create_app(settings, routes)) as gw:
        key = await new_key(gw, rpm=4)  # resolved from the database; Redis is not needed
        shared = [await chat(gw, key) for _ in range(3)]
        assert [r.status_code for r in shared] == [200, 200, 429]  # 4 // 2 replicas
        assert limits_of(shared[0], "requests")[:2] == (2, 1)
        closed = await chat(gw, key, "strict")
        assert closed.status_code == 503
        assert closed.json()["error"]["code"] == "rate_limits_unavailable"
        assert closed.headers["retry-after"] == "1"
        assert gw.state.limiter.degraded == {"local": 3, "closed": 1}
