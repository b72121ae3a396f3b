"""What the served gateway puts in its request records: tenant, error type, and bodies
only for routes that store them, redacted before they leave the process."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from app.config import Settings
from app.main import create_app
from app.store.consolidation import stream_key
from app.store.records import decode_entries
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer

SECRET_TEXT = "I am bob@example.com, key sk-live-abcdefghijklmnopqrstuvwx"


async def shipped(redis_url: str, prefix: str) -> list[dict[str, Any]]:
    """What gateways put on the request stream under `prefix`, in order (then removed)."""
    redis = Redis.from_url(redis_url)
    try:
        entries = await redis.xrange(stream_key(prefix))
        await redis.delete(stream_key(prefix))
    finally:
        await redis.aclose()
    return decode_entries(entries)


async def records(redis_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in await shipped(redis_url, prefix)}


async def test_records_carry_tenant_error_type_and_opted_in_bodies(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer, redis_url: str
) -> None:
    prefix = f"fwrec{uuid.uuid4().hex[:6]}:"
    settings = make_settings(openai_api_key="sk-test-0123456789", flywheel_redis_prefix=prefix)
    routes = routes_for(
        kept=openai_route(openai_upstream.url) | {"bodies": {"store": True, "retention_days": 2}},
        plain=openai_route(openai_upstream.url),
        failing=openai_route(openai_upstream.url, "fail-500") | {"retries": 0},
    )
    async with Served(create_app(settings, routes)) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
            ids = {}
            for model, stream in (
                ("kept", False),
                ("kept", True),
                ("plain", False),
                ("failing", False),
            ):
                resp = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "stream": stream,
                        "messages": [{"role": "user", "content": SECRET_TEXT}],
                    },
                    headers={"authorization": "Bearer client-key-1"},
                )
                ids[(model, stream)] = resp.headers["x-request-id"]
        await gw.state.recorder.flush()
    got = await records(redis_url, prefix)
    kept = got[ids[("kept", False)]]
    assert kept["tenant"]
    assert kept["tenant"] == got[ids[("plain", False)]]["tenant"]
    assert kept["tenant"] != "client-key-1"  # a hash, never the key itself
    bodies = kept["bodies"]
    assert bodies["retention_s"] == 2 * 86400
    content = bodies["request"]["messages"][0]["content"]
    assert content == "I am [EMAIL], key [SECRET]"
    assert bodies["response"]["choices"][0]["message"]["content"]
    streamed = got[ids[("kept", True)]]["bodies"]
    assert streamed["response"]["choices"][0]["message"]["content"]  # assembled from chunks
    assert "sk-live" not in str(streamed)
    assert got[ids[("plain", False)]]["bodies"] is None
    failed = got[ids[("failing", False)]]
    assert failed["status"] >= 500
    assert failed["error_type"]
