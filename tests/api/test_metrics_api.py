"""GET /metrics, /metrics/history and /metrics/summary through `create_app`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, insert

from app.config import Settings
from app.main import create_app
from app.store.metrics_history import align, persist
from app.store.schema import MetricsPoint, RequestRow
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served

DEMO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


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
