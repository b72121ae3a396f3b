"""The response cache through the served gateway: tiers, keys, policy, single-flight,
streaming replay, and a Redis that goes away (a redis-server of the test's own)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from app.config import Settings
from app.main import create_app
from tests.api.test_streaming_api import events
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}},
        },
    }
    for name in ("lookup", "search")
]


def cache_routes(base: str) -> Any:
    on = {"cache": {"mode": "on", "ttl_s": 60}}
    return routes_for(
        cached=openai_route(base) | on,
        slow=openai_route(base, "slow-300") | on,
        # Long enough that a loaded machine still sends the other replica's requests
        # while the fill is in flight (300 ms was not, once, in a busy CI run).
        slower=openai_route(base, "slow-1500") | on,
        truncated=openai_route(base, "length") | on,
        truncated_ok=openai_route(base, "length")
        | {"cache": {"mode": "on", "store_truncated": True}},
        failing=openai_route(base, "fail-500") | on | {"retries": 0},
        read_only=openai_route(base) | {"cache": {"mode": "read_only"}},
        write_only=openai_route(base) | {"cache": {"mode": "write_only"}},
        plain=openai_route(base),
        embed=openai_route(base, "text-embedding-3-small") | on,
        drip=openai_route(base, "drip-20") | on,
    )


def body(marker: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": extra.pop("model", "cached"),
        "messages": [{"role": "user", "content": f"Hello {marker}"}],
        **extra,
    }


def calls(fake: FakeServer, marker: str) -> int:
    """How many requests carrying `marker` reached the fake upstream."""
    return sum(1 for s in fake.seen if marker in json.dumps(s.body))


async def post(gw: Served, payload: Any, **headers: str) -> httpx.Response:
    if isinstance(payload, bytes):
        headers.setdefault("content-type", "application/json")
        return await gw.client.post("/v1/chat/completions", content=payload, headers=headers)
    return await gw.client.post("/v1/chat/completions", json=payload, headers=headers)


@pytest.fixture
def cache_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        return make_settings(openai_api_key="sk-test-secret-0123456789", **overrides)

    return build


@pytest.fixture
async def cgw(
    cache_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> AsyncIterator[Served]:
    app = create_app(cache_settings(), cache_routes(openai_upstream.url))
    async with Served(app) as served:
        yield served


async def test_second_identical_request_is_an_l1_hit(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    first = await post(cgw, body(m))
    second = await post(cgw, body(m))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-flywheel-cache"] == "miss"
    assert second.headers["x-flywheel-cache"] == "hit-l1"
    assert calls(openai_upstream, m) == 1
    a, b = first.json(), second.json()
    assert b["choices"] == a["choices"]
    assert b["usage"] == a["usage"]
    # A hit is a completion of its own: its id is this request's id.
    assert b["id"] == second.headers["x-request-id"] != a["id"]


async def test_key_ignores_order_whitespace_user_and_stream_but_not_parameters(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    base = body(m, temperature=0.2, tools=TOOLS[:1])
    assert (await post(cgw, base)).headers["x-flywheel-cache"] == "miss"
    reordered = json.dumps(dict(reversed(list(base.items()))), indent=3).encode()
    assert (await post(cgw, reordered)).headers["x-flywheel-cache"] == "hit-l1"
    with_user = {**base, "user": "someone", "metadata": {"a": "b"}}
    assert (await post(cgw, with_user)).headers["x-flywheel-cache"] == "hit-l1"
    for changed in (
        {**base, "temperature": 0.3},
        {**base, "tools": TOOLS},
        {**base, "seed": 7},
    ):
        assert (await post(cgw, changed)).headers["x-flywheel-cache"] == "miss"
    # Another tenant (another API key) never sees this tenant's answers.
    other = await post(cgw, base, authorization="Bearer sk-another-tenant")
    assert other.headers["x-flywheel-cache"] == "miss"
    assert calls(openai_upstream, m) == 5


async def test_cache_control_and_ttl_header(cgw: Served, openai_upstream: FakeServer) -> None:
    m = uuid.uuid4().hex
    skipped = await post(cgw, body(m), **{"cache-control": "no-store"})
    assert skipped.headers["x-flywheel-cache"] == "miss"
    assert (await post(cgw, body(m))).headers["x-flywheel-cache"] == "miss"  # nothing stored
    assert (await post(cgw, body(m))).headers["x-flywheel-cache"] == "hit-l1"
    fresh = await post(cgw, body(m), **{"cache-control": "no-cache"})
    assert fresh.headers["x-flywheel-cache"] == "bypass"
    assert calls(openai_upstream, m) == 3
    m2 = uuid.uuid4().hex
    short = await post(cgw, body(m2), **{"x-flywheel-cache-ttl": "0.3"})
    assert short.headers["x-flywheel-cache"] == "miss"
    assert (await post(cgw, body(m2))).headers["x-flywheel-cache"] == "hit-l1"
    await asyncio.sleep(0.5)
    assert (await post(cgw, body(m2))).headers["x-flywheel-cache"] == "miss"
    bad = await post(cgw, body(m2), **{"x-flywheel-cache-ttl": "soon"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "x-flywheel-cache-ttl"


async def test_only_complete_successful_answers_are_stored(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    for _ in range(2):
        cut = await post(cgw, body(m, model="truncated"))
        assert cut.json()["choices"][0]["finish_reason"] == "length"
        assert cut.headers["x-flywheel-cache"] == "miss"
    assert (await post(cgw, body(m, model="truncated_ok"))).headers["x-flywheel-cache"] == "miss"
    assert (await post(cgw, body(m, model="truncated_ok"))).headers["x-flywheel-cache"] == "hit-l1"
    for _ in range(2):
        failed = await post(cgw, body(m, model="failing"))
        assert failed.status_code == 502
        assert failed.headers["x-flywheel-cache"] == "miss"
    assert calls(openai_upstream, m) == 5


async def test_modes_and_routes_without_cache(cgw: Served, openai_upstream: FakeServer) -> None:
    m = uuid.uuid4().hex
    assert (await post(cgw, body(m, model="plain"))).headers["x-flywheel-cache"] == "bypass"
    assert (await post(cgw, body(m, model="plain"))).headers["x-flywheel-cache"] == "bypass"
    # write_only fills what read_only can read? No: the route is part of the key.
    assert (await post(cgw, body(m, model="write_only"))).headers["x-flywheel-cache"] == "bypass"
    assert (await post(cgw, body(m, model="read_only"))).headers["x-flywheel-cache"] == "miss"
    assert (await post(cgw, body(m, model="read_only"))).headers["x-flywheel-cache"] == "miss"
    assert calls(openai_upstream, m) == 5
    assert len(cgw.state.cache.l1) >= 1  # the write_only answer was stored


async def test_concurrent_identical_misses_make_one_upstream_call(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    async with httpx.AsyncClient(
        base_url=cgw.url, timeout=20, limits=httpx.Limits(max_connections=100)
    ) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body(m, model="slow")) for _ in range(100))
        )
    assert all(r.status_code == 200 for r in answers)
    assert calls(openai_upstream, m) == 1
    tiers = [r.headers["x-flywheel-cache"] for r in answers]
    assert tiers.count("miss") == 1
    assert tiers.count("hit-l1") == 99
    texts = {r.json()["choices"][0]["message"]["content"] for r in answers}
    assert len(texts) == 1


async def test_stream_is_cached_and_replayed_in_chunks_and_serves_json(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    payload = body(m, stream=True, stream_options={"include_usage": True})
    payload["messages"][0]["content"] = f"Tell me a long story about {m} " + "and more " * 20
    first, live = await events(cgw, payload)
    assert first.headers["x-flywheel-cache"] == "miss"
    replay_resp, replayed = await events(cgw, payload)
    assert replay_resp.headers["x-flywheel-cache"] == "hit-l1"
    assert replayed[-1] == "[DONE]"
    content_chunks = [
        c for c in replayed[:-1] if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert len(content_chunks) > 3  # chunk by chunk, not one blob

    def text(chunks: list[Any]) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"]
        )

    assert text(replayed) == text(live)
    assert replayed[-2]["usage"] == live[-2]["usage"]
    as_json = await post(
        cgw, {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    )
    assert as_json.headers["x-flywheel-cache"] == "hit-l1"
    assert as_json.json()["choices"][0]["message"]["content"] == text(live)
    assert calls(openai_upstream, m) == 1


async def test_sdk_reassembles_a_cached_tool_call_stream(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    client = openai.AsyncOpenAI(base_url=cgw.url + "/v1", api_key="sk-client", max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "cached",
        "messages": [{"role": "user", "content": f"look up {m}"}],
        "tools": TOOLS,
    }
    json_answer = await client.chat.completions.create(**kwargs)  # fills from JSON
    assert json_answer.choices[0].message.tool_calls
    async with client.chat.completions.stream(**kwargs) as stream:
        final = await stream.get_final_completion()
    raw = await client.chat.completions.with_raw_response.create(**kwargs, stream=True)
    assert raw.headers["x-flywheel-cache"] == "hit-l1"
    calls_json = [
        (c.id, c.function.name, c.function.arguments)
        for c in json_answer.choices[0].message.tool_calls or []
    ]
    calls_stream = [
        (c.id, c.function.name, c.function.arguments)
        for c in final.choices[0].message.tool_calls or []
    ]
    assert calls_stream == calls_json
    assert len(calls_json) == 2
    assert final.choices[0].finish_reason == "tool_calls"
    assert calls(openai_upstream, m) == 1
    await client.close()


async def test_l2_serves_a_restarted_gateway_and_a_second_replica(
    cache_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    routes = cache_routes(openai_upstream.url)
    async with Served(create_app(cache_settings(), routes)) as one:
        assert (await post(one, body(m))).headers["x-flywheel-cache"] == "miss"
        await asyncio.sleep(0.2)  # the L2 write is off the response's path
        async with Served(create_app(cache_settings(), routes)) as two:
            assert (await post(two, body(m))).headers["x-flywheel-cache"] == "hit-l2"
            assert (await post(two, body(m))).headers["x-flywheel-cache"] == "hit-l1"
    async with Served(create_app(cache_settings(), routes)) as restarted:
        assert (await post(restarted, body(m))).headers["x-flywheel-cache"] == "hit-l2"
    assert calls(openai_upstream, m) == 1


async def test_replicas_share_one_fill(
    cache_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    routes = cache_routes(openai_upstream.url)
    async with (
        Served(create_app(cache_settings(), routes)) as one,
        Served(create_app(cache_settings(), routes)) as two,
    ):
        first = asyncio.create_task(post(one, body(m, model="slower")))
        await asyncio.sleep(0.1)  # `one` holds the fill lock and is waiting on the upstream
        # On `two`, one request waits for `one`'s answer and the rest wait for it.
        others = await asyncio.gather(*(post(two, body(m, model="slower")) for _ in range(5)))
        assert (await first).headers["x-flywheel-cache"] == "miss"
        tiers = sorted(r.headers["x-flywheel-cache"] for r in others)
        assert tiers == ["hit-l1"] * 4 + ["hit-l2"]
    assert calls(openai_upstream, m) == 1


async def test_a_purge_reaches_every_replica(
    cache_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    master = "sk-master-test-key-0123456789"
    settings = cache_settings(flywheel_master_key=master)
    routes = cache_routes(openai_upstream.url)
    m = uuid.uuid4().hex
    async with (
        Served(create_app(settings, routes)) as one,
        Served(create_app(settings, routes)) as two,
    ):
        await asyncio.sleep(0.3)  # both subscribed to purges
        assert (await post(one, body(m))).headers["x-flywheel-cache"] == "miss"
        await asyncio.sleep(0.2)
        assert (await post(two, body(m))).headers["x-flywheel-cache"] == "hit-l2"
        assert len(two.state.cache.l1) >= 1
        async with httpx.AsyncClient(base_url=one.url, timeout=10) as client:
            purged = await client.delete(
                "/admin/cache", headers={"authorization": f"Bearer {master}"}
            )
        assert purged.status_code == 200
        for _ in range(40):
            if len(two.state.cache.l1) == 0:
                break
            await asyncio.sleep(0.05)
        assert (await post(two, body(m))).headers["x-flywheel-cache"] == "miss"
    assert calls(openai_upstream, m) == 2


async def test_a_stream_the_client_left_is_not_stored(
    cgw: Served, openai_upstream: FakeServer
) -> None:
    m = uuid.uuid4().hex
    payload = body(m, model="drip", stream=True)
    async with (
        httpx.AsyncClient(base_url=cgw.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=payload) as resp,
    ):
        seen = 0
        async for line in resp.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    await asyncio.sleep(0.3)
    again = await post(cgw, {k: v for k, v in payload.items() if k != "stream"})
    assert again.headers["x-flywheel-cache"] == "miss"
    assert not cgw.state.cache._flights  # the abandoned leader released its flight


async def test_metrics_purge_and_prewarm(
    cache_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    master = "sk-master-test-key-0123456789"
    settings = cache_settings(flywheel_master_key=master)
    routes = cache_routes(openai_upstream.url)
    admin = {"authorization": f"Bearer {master}"}
    m = uuid.uuid4().hex
    async with Served(create_app(settings, routes)) as gw:
        await post(gw, body(m))
        await post(gw, body(m))
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            stats = (await client.get("/metrics/cache")).json()
            assert stats["l1"]["hits"] >= 1
            assert stats["l1"]["entries"] >= 1
            assert stats["l1"]["hit_latency_ms"]["p50"] is not None
            prom = (await client.get("/metrics")).text
            assert 'flywheel_cache_hits_total{tier="l1"}' in prom
            assert (await client.post("/admin/cache/prewarm")).status_code == 401
            await asyncio.sleep(0.2)
    async with (
        Served(create_app(settings, routes)) as fresh,
        httpx.AsyncClient(base_url=fresh.url, timeout=10, headers=admin) as client,
    ):
        warmed = (await client.post("/admin/cache/prewarm", params={"limit": 50})).json()
        assert warmed["loaded"] >= 1
        assert (await post(fresh, body(m))).headers["x-flywheel-cache"] == "hit-l1"
        purged = (await client.delete("/admin/cache", params={"route": "cached"})).json()
        assert purged["l1_removed"] >= 1
        assert purged["l2_removed"] >= 1
        assert (await post(fresh, body(m))).headers["x-flywheel-cache"] == "miss"
        missing = await client.delete("/admin/cache", params={"route": "nope"})
        assert missing.status_code == 404


async def test_embeddings_are_cached(cgw: Served, openai_upstream: FakeServer) -> None:
    m = uuid.uuid4().hex
    payload = {"model": "embed", "input": [f"first {m}", "second"], "user": "u1"}
    async with httpx.AsyncClient(base_url=cgw.url, timeout=10) as client:
        first = await client.post("/v1/embeddings", json=payload)
        second = await client.post("/v1/embeddings", json={**payload, "user": "u2"})
        other = await client.post("/v1/embeddings", json={**payload, "dimensions": 8})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-flywheel-cache"] == "miss"
    assert second.headers["x-flywheel-cache"] == "hit-l1"
    assert other.headers["x-flywheel-cache"] == "miss"
    assert second.json()["data"] == first.json()["data"]
    assert calls(openai_upstream, m) == 2


async def test_a_cached_answer_never_hides_a_bad_field(cgw: Served) -> None:
    m = uuid.uuid4().hex
    assert (await post(cgw, body(m))).headers["x-flywheel-cache"] == "miss"
    for bad in ({"user": 12}, {"stream": 5}, {"stream_options": []}, {"metadata": "x"}):
        resp = await post(cgw, {**body(m), **bad})
        assert resp.status_code == 400, bad
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert (await post(cgw, body(m))).headers["x-flywheel-cache"] == "hit-l1"
