"""Anomaly alerts on the real Redis and database: detection from `requests` rows,
de-duplication across workers within the cooldown, the webhook and its retries, and
outages that skip a tick instead of failing.

Rows are placed around a `now` of the test's own (a random day in 2003) under a route
of its own, and deleted afterwards with the alerts they raised.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.main import create_app
from app.observability.anomaly import Thresholds
from app.store.alerts import list_alerts
from app.store.db import make_engine
from app.store.schema import Alert, Feedback, RequestRow
from tests.conftest import Served, routes_for
from tests.e2e.conftest import free_port
from tests.fakes.webhook import WebhookFake
from workers.tasks.alerts import AlertConfig, AlertLoop, Webhook

WINDOW_S = 300.0
BASELINE_S = 3600.0


@dataclass
class Scene:
    route: str
    now: datetime
    config: AlertConfig

    def subject(self, deployment: str) -> str:
        return f"{self.route}/{deployment}"


@pytest.fixture
async def scene(engine: AsyncEngine, key_prefix: str) -> AsyncIterator[Scene]:
    route = f"al-{uuid.uuid4().hex[:8]}"
    now = datetime(2003, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 300)
    config = AlertConfig(
        prefix=f"{key_prefix}al{uuid.uuid4().hex[:6]}:",  # its own tick lock and cooldowns
        interval_s=30.0,
        window_s=WINDOW_S,
        baseline_s=BASELINE_S,
        cooldown_s=900.0,
        thresholds=Thresholds(min_samples=20),
    )
    yield Scene(route, now, config)
    async with engine.begin() as conn:
        ids = select(RequestRow.id).where(RequestRow.route == route)
        await conn.execute(delete(Feedback).where(Feedback.request_id.in_(ids)))
        await conn.execute(delete(RequestRow).where(RequestRow.route == route))
        await conn.execute(delete(Alert).where(Alert.route == route))


def row(
    scene: Scene, deployment: str, ago_s: float, latency_ms: float, status: int = 200
) -> dict[str, Any]:
    return {
        "id": f"t-{uuid.uuid4().hex}",
        "created_at": scene.now - timedelta(seconds=ago_s),
        "endpoint": "chat.completions",
        "route": scene.route,
        "deployment": deployment,
        "status": status,
        "latency_ms": latency_ms,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost": 0.0,
        "cache_tier": "miss",
        "stream": False,
        "tenant": "acme",
    }


def traffic(
    scene: Scene, deployment: str, n: int, *, window: bool, latency_ms: float, errors: int = 0
) -> list[dict[str, Any]]:
    """n rows spread over the window or the baseline, newest first, latencies +/- 10%;
    the newest `errors` of them failed with 502."""
    span, offset = (WINDOW_S, 0.0) if window else (BASELINE_S, WINDOW_S)
    rows = []
    for i in range(n):
        jitter = 0.1 * latency_ms * (1 if i % 2 else -1)
        status = 502 if i < errors else 200
        ago = offset + span * (i + 0.5) / n
        rows.append(row(scene, deployment, ago, latency_ms + jitter, status))
    return rows


async def add(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(RequestRow), rows)


async def spike(engine: AsyncEngine, scene: Scene) -> None:
    """Two deployments with the same baseline; in the window one is 9x slower."""
    for dep in ("steady", "spiky"):
        await add(engine, traffic(scene, dep, 60, window=False, latency_ms=100.0))
    await add(engine, traffic(scene, "steady", 30, window=True, latency_ms=100.0))
    await add(engine, traffic(scene, "spiky", 30, window=True, latency_ms=900.0))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def fast_webhook(http: aiohttp.ClientSession, url: str, retries: int = 3) -> Webhook:
    return Webhook(http, url, retries, timeout_s=2.0, backoff_base_s=0.01, backoff_cap_s=0.05)


async def test_a_spike_raises_one_alert_delivered_once_after_a_500(
    engine: AsyncEngine, redis: Redis, scene: Scene, http: aiohttp.ClientSession
) -> None:
    await spike(engine, scene)
    with WebhookFake(fail_first=1) as hook:
        webhook = fast_webhook(http, hook.url)
        raised = await AlertLoop(redis, engine, scene.config, webhook).evaluate(scene.now)
        assert [(a["subject"], a["kind"], a["severity"]) for a in raised] == [
            (scene.subject("spiky"), "latency_spike", "critical")
        ]
        # Another worker, a tick later, inside the cooldown: the same spike, no new alert.
        later = scene.now + timedelta(seconds=30)
        again = await AlertLoop(redis, engine, scene.config, webhook).evaluate(later)
        assert again == []
        stored = await list_alerts(engine, subject=scene.subject("spiky"))
        assert len(stored) == 1
        alert = stored[0]
        assert alert["webhook_status"] == "sent"
        # 800 ms above a 100 +/- 10 ms baseline: z ~ 80 (the std is ~10.1 ms).
        assert 75 < alert["z_score"] < 85
        assert alert["value"] == pytest.approx(900.0, rel=0.01)
        assert alert["baseline"] == pytest.approx(100.0, rel=0.01)
        assert await list_alerts(engine, subject=scene.subject("steady")) == []
        # The first POST got a 500 and was retried; the fake took the alert once.
        assert hook.hooks.attempts == 2
        delivered = hook.hooks.for_subject(scene.subject("spiky"))
        assert len(delivered) == 1
        assert delivered[0]["id"] == alert["id"]
        assert delivered[0]["z_score"] == alert["z_score"]
        assert "latency_spike" in delivered[0]["text"]
        assert hook.seen[-1].headers["idempotency-key"] == alert["id"]


async def test_an_alert_is_stored_when_the_webhook_is_down(
    engine: AsyncEngine, redis: Redis, scene: Scene, http: aiohttp.ClientSession
) -> None:
    await spike(engine, scene)
    dead = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    loop = AlertLoop(redis, engine, scene.config, fast_webhook(http, dead, retries=2))
    raised = await loop.evaluate(scene.now)
    assert [a["webhook_status"] for a in raised] == ["failed"]
    stored = await list_alerts(engine, subject=scene.subject("spiky"))
    assert [(a["kind"], a["webhook_status"]) for a in stored] == [("latency_spike", "failed")]


async def test_a_4xx_from_the_webhook_is_final(
    engine: AsyncEngine, redis: Redis, scene: Scene, http: aiohttp.ClientSession
) -> None:
    await spike(engine, scene)
    with WebhookFake(fail_first=1, fail_status=400) as hook:
        loop = AlertLoop(redis, engine, scene.config, fast_webhook(http, hook.url))
        raised = await loop.evaluate(scene.now)
        assert [a["webhook_status"] for a in raised] == ["failed"]
        assert hook.hooks.attempts == 1  # the receiver refused it: a retry would too


async def test_no_webhook_configured(engine: AsyncEngine, redis: Redis, scene: Scene) -> None:
    await spike(engine, scene)
    raised = await AlertLoop(redis, engine, scene.config).evaluate(scene.now)
    assert [a["webhook_status"] for a in raised] == ["not_configured"]


async def test_a_medium_burst_escalates_at_its_second_tick_on_any_worker(
    engine: AsyncEngine, redis: Redis, scene: Scene
) -> None:
    await add(engine, traffic(scene, "d", 100, window=False, latency_ms=50.0))
    # 3 errors in 40 against a clean baseline: z = 0.075 / 0.02 = 3.75, medium.
    await add(engine, traffic(scene, "d", 40, window=True, latency_ms=50.0, errors=3))
    first = await AlertLoop(redis, engine, scene.config).evaluate(scene.now)
    assert first == []
    later = scene.now + timedelta(seconds=1)  # the same rows in the window
    second = await AlertLoop(redis, engine, scene.config).evaluate(later)
    assert [(a["kind"], a["severity"]) for a in second] == [("error_burst", "medium")]
    assert second[0]["z_score"] == pytest.approx(3.75, abs=0.01)


async def test_a_quality_drop_from_feedback(
    engine: AsyncEngine, redis: Redis, scene: Scene
) -> None:
    base = traffic(scene, "d", 40, window=False, latency_ms=50.0)
    recent = traffic(scene, "d", 30, window=True, latency_ms=50.0)
    await add(engine, base + recent)
    scores = [(r, 0.9 + 0.1 * (i % 2)) for i, r in enumerate(base)]
    scores += [(r, 0.2 + 0.2 * (i % 2)) for i, r in enumerate(recent)]
    async with engine.begin() as conn:
        await conn.execute(
            insert(Feedback),
            [
                {
                    "request_id": r["id"],
                    "score": score,
                    "comment": None,
                    "tenant": "acme",  # the request's own tenant: its score counts
                    "created_at": r["created_at"] + timedelta(seconds=1),
                    "updated_at": r["created_at"] + timedelta(seconds=1),
                }
                for r, score in scores
            ]
            # Another tenant's opinion of the recent answers is not their quality.
            + [
                {
                    "request_id": r["id"],
                    "score": 1.0,
                    "comment": None,
                    "tenant": "someone-else",
                    "created_at": r["created_at"] + timedelta(seconds=2),
                    "updated_at": r["created_at"] + timedelta(seconds=2),
                }
                for r in recent
            ],
        )
    raised = await AlertLoop(redis, engine, scene.config).evaluate(scene.now)
    # 0.95 +/- 0.05 down to 0.3: the std floors at 0.1, so z = 0.65 / 0.1.
    assert [(a["kind"], a["severity"]) for a in raised] == [("quality_drop", "high")]
    assert raised[0]["z_score"] == pytest.approx(6.5, abs=0.01)
    assert raised[0]["value"] == pytest.approx(0.3, abs=0.01)
    assert raised[0]["baseline"] == pytest.approx(0.95, abs=0.01)


async def test_only_one_worker_evaluates_a_tick(
    engine: AsyncEngine, redis: Redis, scene: Scene
) -> None:
    loops = [AlertLoop(redis, engine, scene.config, clock=lambda: scene.now) for _ in range(3)]
    results = await asyncio.gather(*(loop.tick() for loop in loops))
    assert sum(r is not None for r in results) == 1


async def test_outages_skip_the_tick_and_are_logged_once(
    engine: AsyncEngine,
    redis: Redis,
    scene: Scene,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="flywheel.alerts")
    dead_redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        loop = AlertLoop(dead_redis, engine, scene.config, clock=lambda: scene.now)
        assert await loop.tick() is None
        assert await loop.tick() is None
    finally:
        await dead_redis.aclose()
    paused = [r for r in caplog.records if "paused" in r.getMessage()]
    assert len(paused) == 1
    # The database away (its port closed), Redis fine: skipped too, then resumed.
    dead_db = make_engine(f"postgresql+asyncpg://127.0.0.1:{free_port()}/none")
    try:
        assert await AlertLoop(redis, dead_db, scene.config).tick() is None
    finally:
        await dead_db.dispose()
    await redis.delete(scene.config.key("tick"))
    loop.redis = redis
    assert await loop.tick() == []
    assert any("resumed" in r.getMessage() for r in caplog.records)


async def test_the_admin_endpoint_lists_and_filters(
    engine: AsyncEngine,
    redis: Redis,
    scene: Scene,
    make_settings: Callable[..., Settings],
) -> None:
    await spike(engine, scene)
    await add(engine, traffic(scene, "failing", 60, window=False, latency_ms=100.0))
    await add(engine, traffic(scene, "failing", 30, window=True, latency_ms=100.0, errors=15))
    raised = await AlertLoop(redis, engine, scene.config).evaluate(scene.now)
    assert sorted((a["subject"], a["kind"]) for a in raised) == [
        (scene.subject("failing"), "error_burst"),
        (scene.subject("spiky"), "latency_spike"),
    ]
    master = "sk-master-alerts-0123456789"
    settings = make_settings(flywheel_master_key=master)
    routes = routes_for(demo={"deployments": [{"name": "m", "provider": "mock", "model": "m"}]})
    async with (
        Served(create_app(settings, routes)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=10) as client,
    ):
        auth = {"authorization": f"Bearer {master}"}
        assert (await client.get("/admin/alerts")).status_code == 401
        since = (scene.now - timedelta(seconds=1)).isoformat()
        resp = await client.get("/admin/alerts", headers=auth, params={"since": since})
        assert resp.status_code == 200
        body = resp.json()
        assert body["object"] == "list"
        mine = [a for a in body["data"] if a["route"] == scene.route]
        assert {a["kind"] for a in mine} == {"error_burst", "latency_spike"}
        one = await client.get(
            "/admin/alerts",
            headers=auth,
            params={"subject": scene.subject("failing"), "kind": "error_burst", "limit": 5},
        )
        [burst] = one.json()["data"]
        assert burst["severity"] == "critical"
        assert burst["value"] == 0.5
        assert burst["details"]["window_errors"] == 15
        none = await client.get(
            "/admin/alerts",
            headers=auth,
            params={"subject": scene.subject("failing"), "kind": "latency_spike"},
        )
        assert none.json()["data"] == []
        later = (scene.now + timedelta(seconds=1)).isoformat()
        after = await client.get(
            "/admin/alerts",
            headers=auth,
            params={"subject": scene.subject("spiky"), "since": later},
        )
        assert after.json()["data"] == []
        # Open: raised within the cooldown of now; the scene's alerts are years old.
        opened = await client.get("/admin/alerts", headers=auth, params={"open": "true"})
        assert opened.json()["cooldown_s"] == settings.flywheel_alert_cooldown_s
        assert not [a for a in opened.json()["data"] if a["route"] == scene.route]
        everything = await client.get("/admin/alerts", headers=auth, params={"limit": 500})
        assert [a for a in everything.json()["data"] if a["route"] == scene.route]
        for bad in ({"limit": 0}, {"limit": 501}, {"kind": "nonsense"}, {"since": "yesterday"}):
            resp = await client.get("/admin/alerts", headers=auth, params=bad)
            assert resp.status_code == 400, bad
            assert resp.json()["error"]["type"] == "invalid_request_error"
