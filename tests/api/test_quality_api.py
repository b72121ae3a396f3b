"""The quality rules on the served gateway: every answer, JSON or streamed, is shipped
with its score and reasons; what the gateway refused itself carries none."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from tests.api.test_records_api import records
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}},
        },
    }
]


@pytest.fixture
async def served(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> AsyncIterator[tuple[Served, str]]:
    prefix = f"fwq{uuid.uuid4().hex[:6]}:"
    settings = make_settings(openai_api_key="sk-test-0123456789", flywheel_redis_prefix=prefix)
    url = openai_upstream.url
    routes = routes_for(
        plain=openai_route(url),
        refuse=openai_route(url, "refuse"),
        badjson=openai_route(url, "bad-json"),
        offschema=openai_route(url, "off-schema"),
        badargs=openai_route(url, "bad-args"),
        length=openai_route(url, "length"),
        failing=openai_route(url, "fail-500") | {"retries": 0},
        refused=openai_route(url, "fail-400") | {"retries": 0},
        slow=openai_route(url, "slow-120") | {"cycle": {"latency_slo_ms": 50}},
        prompt=openai_route(url, "slow-20") | {"cycle": {"latency_slo_ms": 10_000}},
        cached=openai_route(url, "refuse") | {"cache": {"mode": "on"}},
    )
    async with Served(create_app(settings, routes)) as gw:
        yield gw, prefix


async def ask(client: httpx.AsyncClient, model: str, stream: bool, **extra: Any) -> str:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/chat/completions", json=body | extra)
    await resp.aread()
    return resp.headers["x-request-id"]


def quality(rec: dict[str, Any]) -> tuple[float | None, list[str] | None]:
    return rec["quality"], rec["quality_reasons"]


CASES: list[tuple[str, dict[str, Any], float, list[str]]] = [
    ("plain", {}, 1.0, []),
    ("plain", {"response_format": JSON_SCHEMA}, 1.0, []),
    ("plain", {"response_format": {"type": "json_object"}}, 1.0, []),
    ("plain", {"tools": TOOLS}, 1.0, []),
    ("refuse", {}, 0.2, ["refusal"]),
    ("badjson", {"response_format": {"type": "json_object"}}, 0.1, ["invalid_json"]),
    ("badjson", {}, 1.0, []),  # plain text was all that was asked for
    ("offschema", {"response_format": JSON_SCHEMA}, 0.3, ["schema_mismatch"]),
    ("offschema", {"tools": TOOLS}, 1.0, []),  # the fake's tool arguments fit
    ("badargs", {"tools": TOOLS}, 0.1, ["malformed_tool_arguments"]),
    ("length", {}, 0.3, ["truncated"]),
    ("slow", {}, 0.7, ["slow"]),
    ("prompt", {}, 1.0, []),
]


@pytest.mark.parametrize("stream", [False, True])
async def test_answers_are_shipped_with_their_quality(
    served: tuple[Served, str], redis_url: str, stream: bool
) -> None:
    gw, prefix = served
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        for model, extra, _, _ in CASES:
            ids.append(await ask(client, model, stream, **extra))
    await gw.state.recorder.flush()
    got = await records(redis_url, prefix)
    for rid, (model, extra, score, reasons) in zip(ids, CASES, strict=True):
        rec = got[rid]
        assert rec["status"] == 200, (model, extra)
        assert rec["stream"] is stream
        assert quality(rec) == (score, reasons), (model, extra)


async def test_upstream_failures_score_zero_and_gateway_refusals_are_not_judged(
    served: tuple[Served, str], redis_url: str
) -> None:
    gw, prefix = served
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        failed = await ask(client, "failing", False)
        failed_stream = await ask(client, "failing", True)
        upstream_400 = await ask(client, "refused", False)  # the client's own fault
        unknown = await ask(client, "no-such-route", False)
        resp = await client.post("/v1/chat/completions", json={"model": "plain"})
        invalid = resp.headers["x-request-id"]
    await gw.state.recorder.flush()
    got = await records(redis_url, prefix)
    assert got[failed]["status"] >= 500
    assert quality(got[failed]) == (0.0, ["error"])
    assert quality(got[failed_stream]) == (0.0, ["error"])
    for rid in (upstream_400, unknown, invalid):
        assert 400 <= got[rid]["status"] < 500
        assert quality(got[rid]) == (None, None)


async def test_cache_hits_are_scored_like_the_answer_they_replay(
    served: tuple[Served, str], redis_url: str
) -> None:
    gw, prefix = served
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        ids = [await ask(client, "cached", stream) for stream in (False, False, True)]
    await gw.state.recorder.flush()
    got = await records(redis_url, prefix)
    assert [got[i]["cache"] for i in ids] == ["miss", "hit-l1", "hit-l1"]
    assert all(quality(got[i]) == (0.2, ["refusal"]) for i in ids)
