"""Clients that leave early, upstreams that answer oddly or not at all."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.store.records import decode_entries
from tests.api.test_chat_api import assert_openai_error, chat_body, post
from tests.api.test_streaming_api import events
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_first_byte_cancels_upstream(
    gateway: Served, openai_upstream: FakeServer, redis_url: str, key_prefix: str, stream: bool
) -> None:
    before = len(openai_upstream.state.disconnects)
    seen_before = len(openai_upstream.seen)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=0.4) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=chat_body("slow-long", stream=stream))
    gave_up = time.monotonic()
    while len(openai_upstream.state.disconnects) == before and time.monotonic() < gave_up + 1:
        await asyncio.sleep(0.02)
    assert len(openai_upstream.state.disconnects) > before, "upstream still waited after 1 s"
    assert len(openai_upstream.seen) == seen_before + 1
    records = await _records(redis_url, key_prefix, "slow-long")
    ids = [r for r in records if r.get("route") == "slow-long"]
    assert ids[-1]["status"] == 499
    assert ids[-1]["client_disconnected"] is True


async def _records(redis_url: str, key_prefix: str, route: str) -> list[dict[str, Any]]:
    """The session's records, once the 499 of `route` is among them (or after 2 s)."""
    redis = Redis.from_url(redis_url)
    try:
        for _ in range(40):
            records = decode_entries(await redis.xrange(key_prefix + "requests"))
            # The session's stream holds feedback too (no status, no route).
            if any(r.get("status") == 499 and r.get("route") == route for r in records):
                return records
            await asyncio.sleep(0.05)
        return decode_entries(await redis.xrange(key_prefix + "requests"))
    finally:
        await redis.aclose()


async def test_wrong_shaped_upstream_answers_are_502_or_error_events(gateway: Served) -> None:
    assert_openai_error(await post(gateway, chat_body("weird")), 502, "upstream_error")
    resp, got = await events(gateway, chat_body("weird", stream=True))
    assert resp.status_code == 200
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["type"] == "upstream_error"


async def test_null_stream_options_is_accepted(gateway: Served) -> None:
    resp, got = await events(gateway, chat_body(stream=True, stream_options=None))
    assert resp.status_code == 200
    assert got[-1] == "[DONE]"


async def test_embedding_limits(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        huge = await client.post(
            "/v1/embeddings", json={"model": "demo", "input": "x", "dimensions": 10**6}
        )
        assert assert_openai_error(huge, 400, "invalid_request_error")["param"] == "dimensions"
        many = await client.post("/v1/embeddings", json={"model": "demo", "input": ["x"] * 3000})
        assert_openai_error(many, 400, "invalid_request_error")


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address whose accept queue is full: connecting to it hangs (SYNs are dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    yield f"http://127.0.0.1:{port}"
    for s in [*fillers, server]:
        s.close()


async def test_unreachable_upstream_is_bounded_by_the_connect_timeout(
    make_settings: Callable[..., Settings], blackhole: str
) -> None:
    settings = make_settings(flywheel_upstream_connect_timeout_s=0.5)
    routes = routes_for(hole=openai_route(blackhole, "m", api_key_env=None, timeout_s=30))
    async with Served(create_app(settings, routes)) as gw:
        for stream in (False, True):
            started = time.monotonic()
            resp = await post(gw, chat_body("hole", stream=stream))
            assert resp.status_code in (502, 504), resp.text
            assert time.monotonic() - started < 3
