"""Tracing through the served gateway, with an in-process span exporter: a request with
a W3C `traceparent` yields gateway, auth, limits, cache, routing and upstream spans in
that trace, with GenAI attributes; the upstream receives our context; the request
record carries it (for the worker that stores it)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app.config import Settings
from app.main import create_app
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer


@pytest.fixture
async def traced(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> AsyncIterator[tuple[Served, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    settings = make_settings(openai_api_key="sk-trace-0123456789")
    routes = routes_for(
        r1=openai_route(openai_upstream.url) | {"cache": {"mode": "on", "ttl_s": 60}}
    )
    async with Served(create_app(settings, routes, span_exporter=exporter)) as gw:
        yield gw, exporter


def spans_of(gw: Served, exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    assert gw.state.tracing.provider.force_flush(5000)
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and format(s.context.trace_id, "032x") == trace_id
    ]


async def test_a_request_is_one_trace_from_client_to_upstream(
    traced: tuple[Served, InMemorySpanExporter], openai_upstream: FakeServer
) -> None:
    gw, exporter = traced
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    text = f"trace me {uuid.uuid4().hex}"
    body: dict[str, Any] = {"model": "r1", "messages": [{"role": "user", "content": text}]}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        resp = await client.post(
            "/v1/chat/completions",
            json=body,
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
    assert resp.status_code == 200
    spans = spans_of(gw, exporter, trace_id)
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v1/chat/completions"]
    assert server.kind == SpanKind.SERVER
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == parent_id  # the caller's span
    for name in ("auth", "limits", "cache.lookup", "route", "upstream fake-gpt-fake"):
        assert name in by_name, sorted(by_name)
    attempt = by_name["upstream fake-gpt-fake"]
    assert attempt.parent is not None
    assert attempt.parent.span_id == by_name["route"].context.span_id  # type: ignore[union-attr]
    client_spans = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert client_spans  # aiohttp's span for the upstream HTTP request
    a = dict(server.attributes or {})
    assert a["gen_ai.system"] == "openai_compatible"
    assert a["gen_ai.request.model"] == "r1"
    assert a["gen_ai.response.model"] == "gpt-fake"
    assert a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["flywheel.cache"] == "miss"
    assert a["flywheel.deployment"] == "fake-gpt-fake"
    assert a["http.response.status_code"] == 200
    # The upstream was called with our context: same trace, a span of ours as parent.
    seen = next(s for s in openai_upstream.state.seen if text in str(s.body))
    upstream_parent = seen.headers["traceparent"].split("-")
    assert upstream_parent[1] == trace_id
    ours = {format(s.context.span_id, "016x") for s in spans if s.context is not None}
    assert upstream_parent[2] in ours


async def test_a_stream_has_its_own_span_until_its_last_chunk(
    traced: tuple[Served, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    trace_id = secrets.token_hex(16)
    body: dict[str, Any] = {
        "model": "r1",
        "stream": True,
        "messages": [{"role": "user", "content": f"stream me {uuid.uuid4().hex}"}],
    }
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
    by_name = {s.name: s for s in spans_of(gw, exporter, trace_id)}
    stream, server = by_name["stream"], by_name["POST /v1/chat/completions"]
    assert stream.parent is not None
    assert server.context is not None
    assert stream.parent.span_id == server.context.span_id
    a = dict(stream.attributes or {})
    assert a["flywheel.stream.chunks"] == len(lines) > 1
    assert a["flywheel.stream.complete"] is True
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    # It covers the body: it ends after the upstream attempt did, within the request.
    upstream = by_name["upstream fake-gpt-fake"]
    assert upstream.end_time is not None
    assert stream.end_time is not None
    assert server.end_time is not None
    assert upstream.end_time <= stream.end_time <= server.end_time


async def test_cache_hit_and_records_carry_the_trace(
    traced: tuple[Served, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    text = f"hit me {uuid.uuid4().hex}"
    body: dict[str, Any] = {"model": "r1", "messages": [{"role": "user", "content": text}]}
    recorded: list[Any] = []
    recorder = gw.state.recorder
    original = recorder.record

    def spy(rec: Any) -> None:
        recorded.append(rec)
        original(rec)

    recorder.record = spy
    trace_ids = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        for _ in range(2):
            trace_id = secrets.token_hex(16)
            trace_ids.append(trace_id)
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200
    recorder.record = original
    hit = {s.name: s for s in spans_of(gw, exporter, trace_ids[1])}
    assert dict(hit["POST /v1/chat/completions"].attributes or {})["flywheel.cache"] == "hit-l1"
    assert [r.trace_id for r in recorded] == trace_ids
    assert recorded[0].extra["traceparent"].split("-")[1] == trace_ids[0]


async def test_tracing_off_by_default(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    settings = make_settings(openai_api_key="sk-trace-0123456789")
    async with Served(create_app(settings, routes_for(r1=openai_route(openai_upstream.url)))) as gw:
        assert not gw.state.tracing.enabled
        assert gw.state.tracing.client_trace_configs() == []
