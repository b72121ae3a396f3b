"""Streaming through the gateway: flushing, tool-call indexes, failures, disconnects."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis

from app.store.records import decode_entries
from tests.api.test_chat_api import assert_openai_error, chat_body, post
from tests.conftest import Served
from tests.fakes.server import FakeServer


async def events(gw: Served, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    """The response and its SSE data payloads (parsed JSON, or the literal [DONE])."""
    out: list[Any] = []
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else orjson.loads(data))
    return resp, out


async def test_stream_chunks_ids_and_done(gateway: Served) -> None:
    resp, got = await events(gateway, chat_body(stream=True))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["id"] == resp.headers["x-request-id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == "Echo: hello"
    # The gateway asked the upstream for usage; the client did not, so it sees none.
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_usage_when_asked(gateway: Served) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    _, got = await events(gateway, body)
    last = got[-2]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] > 0


async def test_stream_tool_call_indexes_preserved(gateway: Served) -> None:
    tools = [{"type": "function", "function": {"name": n}} for n in ("first", "second")]
    _, got = await events(gateway, chat_body(stream=True, tools=tools))
    calls: dict[int, dict[str, str]] = {}
    for c in got[:-1]:
        for tc in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            slot = calls.setdefault(tc["index"], {"name": "", "args": ""})
            slot["name"] += tc.get("function", {}).get("name") or ""
            slot["args"] += tc.get("function", {}).get("arguments") or ""
    assert {i: s["name"] for i, s in calls.items()} == {0: "first", 1: "second"}
    assert [orjson.loads(calls[i]["args"]) for i in (0, 1)] == [{"q": 0}, {"q": 1}]


async def test_stream_cut_midway_is_an_error_event(gateway: Served) -> None:
    long = [{"role": "user", "content": "one two three four five six seven"}]
    resp, got = await events(gateway, chat_body("cut", stream=True, messages=long))
    assert resp.status_code == 200
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["code"] == "stream_interrupted"
    assert any(c.get("choices") for c in got[:-2])  # the chunks before the cut arrived


async def test_stream_malformed_chunk_is_an_error_event(gateway: Served) -> None:
    _, got = await events(gateway, chat_body("malformed", stream=True))
    assert got[-1] == "[DONE]"
    assert "malformed" in got[-2]["error"]["message"]


async def test_stream_failure_before_first_byte_is_json(gateway: Served) -> None:
    resp = await post(gateway, chat_body("fails-500", stream=True))
    assert_openai_error(resp, 502, "upstream_error")


async def test_stream_chunks_are_flushed_as_they_come(gateway: Served) -> None:
    # The drip fake writes a chunk every 20 ms; the first must arrive long before the end.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        started = time.monotonic()
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body("drip", stream=True)
        ) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 3:
                        break
        assert time.monotonic() - started < 2.0


async def test_disconnect_cancels_upstream_and_records_usage(
    gateway: Served, openai_upstream: FakeServer, redis_url: str, key_prefix: str
) -> None:
    before = len(openai_upstream.state.disconnects)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body("drip", stream=True)
        ) as resp:
            request_id = resp.headers["x-request-id"]
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 5:
                    break
        closed_at = time.monotonic()
    deadline = closed_at + 1.0
    while len(openai_upstream.state.disconnects) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(openai_upstream.state.disconnects) > before, "upstream not cancelled within 1 s"
    assert openai_upstream.state.disconnects[-1] - closed_at < 1.0

    redis = Redis.from_url(redis_url)
    record = None
    for _ in range(100):
        entries = await redis.xrange(key_prefix + "requests")
        matches = [r for r in decode_entries(entries) if r["request_id"] == request_id]
        if matches:
            record = matches[0]
            break
        await asyncio.sleep(0.05)
    await redis.aclose()
    assert record is not None, "no request record for the disconnected stream"
    assert record["client_disconnected"] is True
    assert record["completion_tokens"] > 0
    assert record["usage_estimated"] is True
