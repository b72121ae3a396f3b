"""GET /metrics, /metrics/history and /metrics/summary through `create_app`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, insert

from app.config import Settings
from app.main import create_app
from app.store.metrics_history import align, persist
from app.store.schema import MetricsPoint, RequestRow
from tests.api.test_chat_api import assert_openai_error
from tests.api.test_streaming_api import events
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer

DEMO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
DURATION = "flywheel_request_duration_seconds"
TTFT = "flywheel_time_to_first_token_seconds"
USAGE = {"stream_options": {"include_usage": True}}


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    """A sample's labels as `samples` keys them."""
    return tuple(sorted(labels.items()))


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric from an exposition, which must parse as a whole."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_history_accepts_whole_hours_from_1_to_24(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        for bad in ("0", "25", "-1", "1.5", "abc", ""):
            resp = await client.get("/metrics/history", params={"hours": bad})
            error = assert_openai_error(resp, 400, "invalid_request_error")
            assert error["param"] == "hours", bad
        for good in ("1", "24"):
            resp = await client.get("/metrics/history", params={"hours": good})
            assert resp.status_code == 200, resp.text
            assert resp.json()["hours"] == int(good)
        assert (await client.get("/metrics/history")).json()["hours"] == 1


async def test_history_shows_what_the_job_persisted(gateway: Served) -> None:
    """Rows as the consolidator writes them, one job run, and the counts come back."""
    state = gateway.state
    interval = state.settings.flywheel_metrics_interval_s
    route = f"hist-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    sent = {"d1": 7, "d2": 3}
    rows = [
        {
            "id": f"{route}-{d}-{i}",
            "created_at": now - timedelta(seconds=i % 2),
            "endpoint": "chat.completions",
            "route": route,
            "deployment": d,
            "status": 200 if i else 500,
            "latency_ms": 10.0 + i,
            "cache_tier": "miss",
        }
        for d, n in sent.items()
        for i in range(n)
    ]
    async with state.engine.begin() as conn:
        await conn.execute(insert(RequestRow), rows)
    try:
        await persist(state.engine, now=now, interval_s=interval, history_points=288)
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            history = (await client.get("/metrics/history", params={"hours": 1})).json()
        assert history["interval_s"] == interval
        mine = {s["deployment"]: s["points"] for s in history["series"] if s["route"] == route}
        assert {d: sum(p["requests"] for p in pts) for d, pts in mine.items()} == sent
        assert sum(p["errors"] for p in mine["d1"]) == 1
        assert mine["d1"][-1]["errors_by_class"] == {"5xx": 1}
        stamps = [p["bucket_start"] for p in history["totals"]]
        assert stamps == sorted(stamps)
        assert sum(p["requests"] for p in history["totals"]) >= 10
        # What the dashboard asks for: the totals alone, or one route's series alone.
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            lean = (await client.get("/metrics/history", params={"series": "false"})).json()
            one = (await client.get("/metrics/history", params={"route": route})).json()
        assert lean["series"] == []
        assert lean["totals"] == history["totals"]
        assert {s["route"] for s in one["series"]} == {route}
        assert {s["deployment"]: s["points"] for s in one["series"]} == mine
        assert one["totals"] == history["totals"]
    finally:
        async with state.engine.begin() as conn:
            await conn.execute(delete(RequestRow).where(RequestRow.route == route))
            # Points are derived data; the next run recomputes the buckets touched here.
            since = align(now, interval) - timedelta(seconds=interval)
            await conn.execute(delete(MetricsPoint).where(MetricsPoint.bucket_start >= since))


async def test_database_down_gives_503_quickly_and_a_summary_still(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(database_url="postgresql://127.0.0.1:1/none")
    async with Served(create_app(settings)) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        started = time.perf_counter()
        resp = await client.get("/metrics/history", params={"hours": 2})
        assert time.perf_counter() - started < 4
        error = assert_openai_error(resp, 503, "server_error")
        assert error["code"] == "database_unavailable"
        summary = (await client.get("/metrics/summary")).json()
    assert summary["latest_point"] is None
    assert summary["history"]["database"].startswith("down")


async def test_summary_and_requests_counter(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=DEMO)).status_code == 200
        unknown = await client.post(
            "/v1/chat/completions", json={**DEMO, "model": f"made-up-{uuid.uuid4().hex}"}
        )
        assert unknown.status_code == 404
        summary = (await client.get("/metrics/summary")).json()
        text = (await client.get("/metrics")).text
    assert summary["object"] == "metrics.summary"
    assert summary["requests"]["by_route"] == {"demo": 3, "other": 1}
    assert summary["requests"]["by_status"] == {"2xx": 3, "4xx": 1}
    assert summary["requests"]["total"] == 4
    assert summary["process"]["multiprocess_metrics"] is False
    assert {d["route"] for d in summary["deployments"]} >= {"demo", "gpt-fake"}
    assert "l1" in summary["cache"]
    assert summary["history"]["database"] == "ok"
    assert "latest_point" in summary
    counted = samples(text, "flywheel_requests_total")
    assert counted[(("cache", "bypass"), ("route", "demo"), ("status", "2xx"))] == 3
    assert counted[(("cache", "bypass"), ("route", "other"), ("status", "4xx"))] == 1
    assert sum(counted.values()) == 4  # scrapes and summaries are not API requests
    assert samples(text, "flywheel_gateway_processes") == {(): 1.0}
    assert samples(text, "flywheel_requests_in_flight") == {(): 0.0}  # all answered


async def test_in_flight_counts_requests_until_their_stream_ends(gateway: Served) -> None:
    body = {**DEMO, "model": "drip", "stream": True}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            await anext(resp.aiter_lines())  # started, far from done
            during = (await client.get("/metrics")).text
        after = (await client.get("/metrics")).text
    assert samples(during, "flywheel_requests_in_flight") == {(): 1.0}
    assert samples(after, "flywheel_requests_in_flight") == {(): 0.0}


def mock(name: str, latency_ms: float, **extra: Any) -> dict[str, Any]:
    params = {"latency_ms": latency_ms, "jitter_ms": 0, "quality": 1.0}
    return {"name": name, "provider": "mock", "model": name, "mock": params, **extra}


@pytest.fixture
async def timed(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> AsyncIterator[Served]:
    """Routes whose latencies sit mid-bucket, so every request's bucket is known."""
    routes = routes_for(
        # ~300 ms: in (0.25, 0.5]
        timed={
            "deployments": [mock("mock-t", 300, input_cost_per_1k=0.5, output_cost_per_1k=1.0)],
            "cache": {"mode": "on"},
        },
        # First token after 40% of 625 ms (~250 ms: in (0.2, 0.3]), all of it in (0.5, 0.75]
        streamy={"deployments": [mock("mock-s", 625)]},
        # The failing upstream first, then the mock: retried requests
        flaky={
            "strategy": "priority",
            "deployments": [
                {**openai_route(openai_upstream.url, "fail-500")["deployments"][0], "priority": 0},
                mock("mock-f", 5, priority=1),
            ],
        },
    )
    settings = make_settings(openai_api_key="sk-test-secret-0123456789")
    async with Served(create_app(settings, routes)) as gw:
        yield gw


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "timed", "messages": [{"role": "user", "content": content}], **extra}


async def scrape_when(client: httpx.AsyncClient, requests: int) -> str:
    """/metrics once every request is counted (a stream is recorded as its body ends)."""
    deadline = time.monotonic() + 5
    while True:
        text = (await client.get("/metrics")).text
        if sum(samples(text, "flywheel_requests_total").values()) >= requests:
            return text
        assert time.monotonic() < deadline, "requests not counted"
        await asyncio.sleep(0.05)


async def test_histograms_tokens_cost_and_retries(timed: Served) -> None:
    async with httpx.AsyncClient(base_url=timed.url, timeout=10) as client:
        answers = [await client.post("/v1/chat/completions", json=chat(f"q{i}")) for i in range(3)]
        # The cache is written off the response path: ask again until the answer is stored.
        for _ in range(100):
            again = await client.post("/v1/chat/completions", json=chat("q0"))
            if again.headers["x-flywheel-cache"] == "hit-l1":
                break
            answers.append(again)
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the answer was never cached")
        streamed = [
            await events(timed, chat(f"s{i}", model="streamy", stream=True, **USAGE))
            for i in range(2)
        ]
        flaky = [
            await client.post("/v1/chat/completions", json=chat("f", model="flaky"))
            for _ in range(3)
        ]
        unknown = await client.post("/v1/chat/completions", json=chat("u", model="no-such-route"))
        assert unknown.status_code == 404
        total = len(answers) + 1 + len(streamed) + len(flaky) + 1
        text = await scrape_when(client, total)
    assert {(a.status_code, a.headers["x-flywheel-cache"]) for a in answers} == {(200, "miss")}

    def at(route: str, deployment: str, status: str, cache: str, le: str = "") -> float:
        """A duration bucket's count; its _count without `le`, its _sum with le="sum"."""
        labels = {"route": route, "deployment": deployment, "status": status, "cache": cache}
        if le == "sum":
            return samples(text, DURATION + "_sum")[key(**labels)]
        if not le:
            return samples(text, DURATION + "_count")[key(**labels)]
        return samples(text, DURATION + "_bucket")[key(**labels, le=le)]

    n = len(answers)
    assert [at("timed", "mock-t", "2xx", "miss", le) for le in ("0.25", "0.5", "+Inf")] == [0, n, n]
    assert at("timed", "mock-t", "2xx", "miss") == n
    assert 0.3 * n <= at("timed", "mock-t", "2xx", "miss", "sum") <= 0.5 * n
    # The hit: no deployment answered it, and it was fast.
    assert at("timed", "none", "2xx", "hit-l1", "0.25") == 1
    assert [at("streamy", "mock-s", "2xx", "bypass", le) for le in ("0.5", "0.75")] == [0, 2]
    assert at("other", "none", "4xx", "bypass", "+Inf") == 1

    ttft = samples(text, TTFT + "_bucket")
    pair = {"route": "streamy", "deployment": "mock-s"}
    assert [ttft[key(**pair, le=le)] for le in ("0.2", "0.3")] == [0, 2]
    assert {dict(k)["route"] for k in ttft} == {"streamy"}  # streams only

    def usage(route: str, deployment: str, name: str, **extra: str) -> float:
        return samples(text, name)[key(route=route, deployment=deployment, **extra)]

    sent = [a.json()["usage"] for a in answers]
    prompt, completion = (
        sum(u["prompt_tokens"] for u in sent),
        sum(u["completion_tokens"] for u in sent),
    )
    assert usage("timed", "mock-t", "flywheel_tokens_total", kind="prompt") == prompt
    assert usage("timed", "mock-t", "flywheel_tokens_total", kind="completion") == completion
    # The hit replayed a stored answer: no upstream tokens, no cost.
    assert usage("timed", "none", "flywheel_tokens_total", kind="prompt") == 0
    assert usage("timed", "mock-t", "flywheel_cost_usd_total") == pytest.approx(
        prompt / 1000 * 0.5 + completion / 1000 * 1.0
    )
    assert usage("timed", "none", "flywheel_cost_usd_total") == 0
    streamed_usage = [chunks[-2]["usage"] for _, chunks in streamed]
    assert usage("streamy", "mock-s", "flywheel_tokens_total", kind="completion") == sum(
        u["completion_tokens"] for u in streamed_usage
    )
    retried = sum(int(r.headers["x-flywheel-attempts"]) - 1 for r in flaky)
    assert {r.status_code for r in flaky} == {200}
    assert retried >= 1
    assert usage("flaky", "mock-f", "flywheel_retries_total") == retried
    assert usage("timed", "mock-t", "flywheel_retries_total") == 0


async def test_metrics_token_guards_every_metrics_endpoint(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    token, master = "scrape-token-5c1e7a", "sk-master-key-0123456789"
    settings = make_settings(flywheel_metrics_token=token, flywheel_master_key=master)
    paths = ("/metrics", "/metrics/summary", "/metrics/cache", "/metrics/history")
    async with Served(create_app(settings)) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        for path in paths:
            missing = await client.get(path)
            assert assert_openai_error(missing, 401, "authentication_error")["code"] == (
                "missing_api_key"
            )
            assert missing.headers["www-authenticate"].startswith("Bearer")
            for wrong, code in (
                (f"Bearer {token}x", "invalid_api_key"),
                (f"bearer {token[:-1]}", "invalid_api_key"),
                (f"Basic {token}", "missing_api_key"),
                (token, "missing_api_key"),
            ):
                resp = await client.get(path, headers={"authorization": wrong})
                error = assert_openai_error(resp, 401, "authentication_error")
                assert token not in resp.text
                assert error["code"] == code, wrong
            for good in (token, master):
                resp = await client.get(path, headers={"authorization": f"Bearer {good}"})
                assert resp.status_code == 200, (path, resp.text)
        scraped = await client.get("/metrics", headers={"authorization": f"Bearer {token}"})
        # Health stays open: load balancers probe it without credentials.
        assert (await client.get("/health")).status_code == 200
    assert "flywheel_requests_total" in scraped.text
    assert token not in caplog.text
    assert master not in caplog.text
