"""The operator's view of routes through `create_app`: the master key, each route's config
and this replica's runtime state, configured against cycle-published weights, health
from the latest completed run against the route's thresholds, one route's history over a
window, an unknown route, and Redis or the database down.

Route names carry a per-test tag, so runs other tests stored never cover them; the runs a
test stores are removed after it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.main import create_app
from app.routing.weights import weights_key
from app.store import route_history
from app.store.cycle_runs import finish_run, start_run
from app.store.schema import CycleRun
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served, create_key, routes_for
from tests.e2e.conftest import free_port

MASTER = "sk-master-routes-admin-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
UPSTREAM_SECRET = "sk-upstream-routes-0123456789"
API_BASE = "http://upstream-routes.invalid:9/v1"
UNSET_ENV = "FLYWHEEL_TEST_ROUTES_ADMIN_UNSET_KEY"


def mock(name: str, weight: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "mock", "model": name, "weight": weight, **extra}


@dataclass
class Rig:
    gw: Served
    client: httpx.AsyncClient
    prefix: str
    adaptive: str  # adaptive, thresholds 0.7 / 0.8 / 0.9
    plain: str  # priority: a keyed upstream and one disabled (its key unset)
    ensemble: str
    run_ids: list[str] = field(default_factory=list)


def spec(tag: str) -> dict[str, dict[str, Any]]:
    adaptive, plain, ensemble = f"ra-a-{tag}", f"ra-p-{tag}", f"ra-e-{tag}"
    return {
        adaptive: {
            "strategy": "adaptive",
            "deployments": [
                mock("fast", 3, input_cost_per_1k=0.0001, output_cost_per_1k=0.0002),
                mock("smart", 1, mock={"latency_ms": 1, "jitter_ms": 0}),
            ],
            "fallbacks": [plain],
            "cycle": {"critical": 0.7, "warning": 0.8, "target": 0.9},
        },
        plain: {
            "strategy": "priority",
            "deployments": [
                {
                    "name": "keyed",
                    "provider": "openai_compatible",
                    "model": "gpt-x",
                    "api_base": API_BASE,
                    "api_key_env": "OPENAI_API_KEY",
                    "priority": 1,
                },
                {
                    "name": "unkeyed",
                    "provider": "openai",
                    "model": "gpt-y",
                    "api_key_env": UNSET_ENV,
                },
            ],
        },
        ensemble: {"ensemble": {"strategy": "first_success", "members": [adaptive, plain]}},
    }


@pytest.fixture
async def rig(
    make_settings: Callable[..., Settings], own_prefix: str, engine: AsyncEngine
) -> AsyncIterator[Rig]:
    routes = spec(uuid.uuid4().hex[:8])
    adaptive, plain, ensemble = list(routes)
    settings = make_settings(
        flywheel_master_key=MASTER, flywheel_redis_prefix=own_prefix, openai_api_key=UPSTREAM_SECRET
    )
    async with (
        Served(create_app(settings, routes_for(**routes))) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client,
    ):
        rig = Rig(gw, client, own_prefix, adaptive, plain, ensemble)
        yield rig
    async with engine.begin() as conn:
        await conn.execute(delete(CycleRun).where(CycleRun.id.in_(rig.run_ids)))


async def add_run(
    rig: Rig,
    engine: AsyncEngine,
    at: datetime,
    routes: dict[str, Any] | None,
    status: str = "completed",
) -> str:
    run_id = f"run_ra{uuid.uuid4().hex[:20]}"
    rig.run_ids.append(run_id)
    await start_run(engine, run_id, at, "manual", None)
    if status != "running":
        await finish_run(engine, run_id, at + timedelta(seconds=2), status=status, routes=routes)
    return run_id


def figures(quality: float | None, weights: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "requests": 120,
        "quality": quality,
        "quality_variance": 0.01,
        "trend_per_h": -0.002,
        "error_rate": 0.05,
        "p95_latency_ms": 812.5,
        "cost_per_request": 0.00012,
        "budgets": {"latency_ms": 1500.0, "cost_usd": 0.001},
        "deployments": {
            "fast": {"requests": 90, "quality": quality, "error_rate": 0.0},
            "smart": {"requests": 30, "quality": 0.99, "error_rate": 0.0},
        },
        "variants": {},
        "weights": weights,
        "bandit": None,
    }


def by_name(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in listing["data"]}


async def test_the_routes_need_the_master_key(rig: Rig) -> None:
    virtual = (await create_key(rig.gw.url, MASTER, name="not-admin"))["key"]
    async with httpx.AsyncClient(base_url=rig.gw.url, timeout=10) as anon:
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": f"Bearer {virtual}"},
        ):
            # Whatever the admin dependency answers for /admin/keys, it answers here.
            reference = await anon.get("/admin/keys", headers=headers)
            assert reference.status_code in (401, 403)
            for path in ("/admin/routes", f"/admin/routes/{rig.adaptive}"):
                resp = await anon.get(path, headers=headers)
                assert resp.status_code == reference.status_code
                assert_openai_error(resp, resp.status_code, reference.json()["error"]["type"])


async def test_listing_shows_config_and_runtime_but_no_secret(rig: Rig) -> None:
    # One request, so this replica has a latency figure for the deployment it used.
    body = {"model": rig.adaptive, "messages": [{"role": "user", "content": "hi"}]}
    assert (await rig.client.post("/v1/chat/completions", json=body)).status_code == 200
    resp = await rig.client.get("/admin/routes")
    assert resp.status_code == 200, resp.text
    listing = resp.json()
    assert (listing["object"], listing["breakers_of"], listing["weights_error"]) == (
        "list",
        "this replica",
        None,
    )
    routes = by_name(listing)
    assert list(routes) == [rig.adaptive, rig.plain, rig.ensemble]  # the file's order
    adaptive, plain, ensemble = routes[rig.adaptive], routes[rig.plain], routes[rig.ensemble]
    assert adaptive["strategy"] == "adaptive"
    assert adaptive["fallbacks"] == [rig.plain]
    assert (adaptive["ensemble"], ensemble["ensemble"]) == (False, True)
    assert adaptive["thresholds"] == {"critical": 0.7, "warning": 0.8, "target": 0.9}
    assert plain["thresholds"] == {"critical": 0.85, "warning": 0.9, "target": 0.95}
    fast = adaptive["deployments"][0]
    assert {k: fast[k] for k in ("name", "provider", "model", "config_weight", "priority")} == {
        "name": "fast",
        "provider": "mock",
        "model": "fast",
        "config_weight": 3.0,
        "priority": 0,
    }
    assert (fast["input_cost_per_1k"], fast["output_cost_per_1k"]) == (0.0001, 0.0002)
    assert (fast["enabled"], fast["disabled_reason"], fast["live_weight"]) == (True, None, None)
    assert fast["circuit"]["state"] == "closed"
    assert {"limit", "in_flight"} <= set(fast["concurrency"])
    ewmas = [d["latency_ewma_ms"] for d in adaptive["deployments"]]
    assert sum(e is not None for e in ewmas) == 1  # the one that answered
    keyed, unkeyed = plain["deployments"]
    assert (keyed["enabled"], keyed["priority"]) == (True, 1)
    assert (unkeyed["enabled"], unkeyed["circuit"], unkeyed["latency_ewma_ms"]) == (
        False,
        None,
        None,
    )
    assert unkeyed["disabled_reason"] == "api_key_env is not set"
    assert (ensemble["deployments"], ensemble["weights"], ensemble["health"]) == ([], {}, "unknown")
    for secret in (UPSTREAM_SECRET, MASTER, API_BASE, "OPENAI_API_KEY", UNSET_ENV, "api_base"):
        assert secret not in resp.text
    detail = await rig.client.get(f"/admin/routes/{rig.plain}")
    for secret in (UPSTREAM_SECRET, API_BASE, "OPENAI_API_KEY", UNSET_ENV, "api_base"):
        assert secret not in detail.text


async def test_weights_from_config_until_the_cycle_publishes(rig: Rig, redis: Redis) -> None:
    before = by_name((await rig.client.get("/admin/routes")).json())
    assert (before[rig.adaptive]["weights"], before[rig.adaptive]["weights_source"]) == (
        {"fast": 3.0, "smart": 1.0},
        "config",
    )
    await redis.hset(weights_key(rig.prefix, rig.adaptive), mapping={"fast": 0.25, "smart": 0.75})  # type: ignore[misc]
    # The router takes published weights only for adaptive routes: a hash for the
    # priority route changes nothing.
    await redis.hset(weights_key(rig.prefix, rig.plain), mapping={"keyed": 9.0})  # type: ignore[misc]
    after = by_name((await rig.client.get("/admin/routes")).json())
    adaptive = after[rig.adaptive]
    assert (adaptive["weights"], adaptive["weights_source"]) == (
        {"fast": 0.25, "smart": 0.75},
        "cycle",
    )
    assert [d["live_weight"] for d in adaptive["deployments"]] == [0.25, 0.75]
    assert [d["config_weight"] for d in adaptive["deployments"]] == [3.0, 1.0]
    plain = after[rig.plain]
    assert (plain["weights"], plain["weights_source"]) == ({"keyed": 1.0, "unkeyed": 1.0}, "config")
    assert [d["live_weight"] for d in plain["deployments"]] == [None, None]
    one = (await rig.client.get(f"/admin/routes/{rig.adaptive}")).json()
    assert (one["weights"], one["weights_source"]) == ({"fast": 0.25, "smart": 0.75}, "cycle")


async def test_health_from_the_latest_completed_run(rig: Rig, engine: AsyncEngine) -> None:
    fresh = by_name((await rig.client.get("/admin/routes")).json())[rig.adaptive]
    assert (fresh["health"], fresh["quality"], fresh["requests"], fresh["last_run_at"]) == (
        "unknown",
        None,
        None,
        None,
    )
    now = datetime.now(UTC)
    await add_run(rig, engine, now - timedelta(minutes=10), {rig.adaptive: figures(0.99)})
    latest = await add_run(rig, engine, now, {rig.adaptive: figures(0.75), rig.plain: figures(0.5)})
    # Neither a failed nor a running run counts, however recent.
    await add_run(rig, engine, now + timedelta(seconds=1), {rig.adaptive: figures(0.1)}, "failed")
    await add_run(rig, engine, now + timedelta(seconds=2), None, "running")
    routes = by_name((await rig.client.get("/admin/routes")).json())
    adaptive = routes[rig.adaptive]
    assert adaptive["health"] == "warning"  # 0.7 <= 0.75 < 0.8
    assert routes[rig.plain]["health"] == "critical"  # 0.5 < 0.85
    assert routes[rig.ensemble]["health"] == "unknown"  # the run did not cover it
    assert (adaptive["last_run_id"], adaptive["last_run_at"]) == (latest, now.isoformat())
    expected = {
        "quality": 0.75,
        "trend_per_h": -0.002,
        "requests": 120,
        "error_rate": 0.05,
        "p95_latency_ms": 812.5,
        "cost_per_request": 0.00012,
    }
    assert {k: adaptive[k] for k in expected} == expected
    await add_run(rig, engine, now + timedelta(seconds=3), {rig.adaptive: figures(0.8)})
    at_warning = by_name((await rig.client.get("/admin/routes")).json())[rig.adaptive]
    assert at_warning["health"] == "ok"  # not under the warning threshold
    await add_run(rig, engine, now + timedelta(seconds=4), {rig.adaptive: figures(0.6999)})
    detail = (await rig.client.get(f"/admin/routes/{rig.adaptive}")).json()
    assert (detail["health"], detail["quality"]) == ("critical", 0.6999)


async def test_history_oldest_first_within_the_window(rig: Rig, engine: AsyncEngine) -> None:
    now = datetime.now(UTC)
    old = await add_run(rig, engine, now - timedelta(hours=30), {rig.adaptive: figures(0.91)})
    ids = [
        await add_run(rig, engine, now - timedelta(hours=h), {rig.adaptive: figures(q, w)})
        for h, q, w in ((3, 0.92, None), (2, 0.93, {"fast": 0.4, "smart": 0.6}), (1, 0.94, None))
    ]
    await add_run(rig, engine, now - timedelta(minutes=30), {rig.adaptive: figures(0.1)}, "failed")
    uncovered = await add_run(rig, engine, now - timedelta(minutes=20), {rig.plain: figures(0.5)})
    resp = await rig.client.get(f"/admin/routes/{rig.adaptive}")
    assert resp.status_code == 200, resp.text
    detail = resp.json()
    assert (detail["name"], detail["hours"], detail["history_truncated"]) == (
        rig.adaptive,
        24,
        False,
    )
    history = detail["history"]
    assert [p["run_id"] for p in history] == [*ids, uncovered]
    assert [p["quality"] for p in history] == [0.92, 0.93, 0.94, None]
    assert [p["at"] for p in history] == sorted(p["at"] for p in history)
    second = history[1]
    assert second["weights"] == {"fast": 0.4, "smart": 0.6}
    assert second["deployments"] == {
        "fast": {"quality": 0.93, "requests": 90},
        "smart": {"quality": 0.99, "requests": 30},
    }
    assert set(second) == {
        "run_id",
        "at",
        "quality",
        "trend_per_h",
        "requests",
        "error_rate",
        "p95_latency_ms",
        "cost_per_request",
        "weights",
        "deployments",
    }
    assert history[-1]["deployments"] == {}  # a run that did not cover the route
    # The newest completed run did not cover the route: nothing to rate it by.
    assert (detail["health"], detail["last_run_id"]) == ("unknown", uncovered)
    wider = (await rig.client.get(f"/admin/routes/{rig.adaptive}?hours=48")).json()
    assert [p["run_id"] for p in wider["history"]] == [old, *ids, uncovered]
    for hours in (0, 169, "x"):
        bad = await rig.client.get(f"/admin/routes/{rig.adaptive}", params={"hours": hours})
        assert assert_openai_error(bad, 400, "invalid_request_error")["param"] == "hours"


async def test_history_is_bounded_and_shaped_off_the_loop_when_long(
    rig: Rig, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    ids = [
        await add_run(rig, engine, now - timedelta(minutes=10 - i), {rig.adaptive: figures(0.9)})
        for i in range(5)
    ]
    monkeypatch.setattr(route_history, "MAX_RUNS", 3)
    monkeypatch.setattr(route_history, "SHAPE_INLINE_MAX", 1)  # through asyncio.to_thread
    detail = (await rig.client.get(f"/admin/routes/{rig.adaptive}")).json()
    assert [p["run_id"] for p in detail["history"]] == ids[2:]  # the newest, oldest first
    assert detail["history_truncated"] is True
    assert detail["last_run_id"] == ids[-1]


async def test_history_of_a_route_without_runs_in_the_window(rig: Rig, engine: AsyncEngine) -> None:
    old = await add_run(
        rig, engine, datetime.now(UTC) - timedelta(hours=50), {rig.adaptive: figures(0.95)}
    )
    detail = (await rig.client.get(f"/admin/routes/{rig.adaptive}?hours=1")).json()
    assert detail["history"] == []
    # The rating still comes from the latest completed run, outside the window.
    assert (detail["last_run_id"], detail["quality"], detail["health"]) == (old, 0.95, "ok")


async def test_unknown_route_is_a_404(rig: Rig) -> None:
    for name in ("no-such-route", "vendor/model-x"):
        resp = await rig.client.get(f"/admin/routes/{name}")
        error = assert_openai_error(resp, 404, "invalid_request_error")
        assert error["code"] == "route_not_found"


async def test_redis_down_keeps_the_configured_weights(
    make_settings: Callable[..., Settings],
) -> None:
    routes = spec(uuid.uuid4().hex[:8])
    adaptive = next(iter(routes))
    settings = make_settings(
        flywheel_master_key=MASTER,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
    )
    async with (
        Served(create_app(settings, routes_for(**routes))) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client,
    ):
        listing = await client.get("/admin/routes")
        detail = await client.get(f"/admin/routes/{adaptive}")
    assert listing.status_code == 200, listing.text
    assert detail.status_code == 200, detail.text
    for body in (by_name(listing.json())[adaptive], detail.json()):
        assert (body["weights"], body["weights_source"]) == ({"fast": 3.0, "smart": 1.0}, "config")
        assert [d["live_weight"] for d in body["deployments"]] == [None, None]
    assert listing.json()["weights_error"] == detail.json()["weights_error"] == "redis_unavailable"


async def test_database_down_is_a_503(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        flywheel_master_key=MASTER, database_url="postgresql://127.0.0.1:1/none"
    )
    routes = spec(uuid.uuid4().hex[:8])
    async with (
        Served(create_app(settings, routes_for(**routes))) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=20) as client,
    ):
        for path in ("/admin/routes", f"/admin/routes/{next(iter(routes))}"):
            resp = await client.get(path)
            error = assert_openai_error(resp, 503, "server_error")
            assert error["code"] == "database_unavailable"


async def test_history_of_a_route_whose_name_json_paths_cannot_quote(engine: AsyncEngine) -> None:
    """SQLite's JSON path does not escape a quote or a backslash in a key: such a route's
    figures are picked out of the run after reading it, on both databases alike."""
    name = f'odd"na\\me-{uuid.uuid4().hex[:6]}'
    at = datetime(1999, 1, 1, tzinfo=UTC) + timedelta(minutes=uuid.uuid4().int % 100_000)
    run_id = f"run_{uuid.uuid4().hex[:24]}"
    await start_run(engine, run_id, at, "manual", None)
    figures = {"quality": 0.91, "requests": 7, "weights": {"a": 1.0}, "deployments": {}}
    await finish_run(engine, run_id, at, status="completed", routes={name: figures, "x": {}})
    try:
        found = await route_history.route_history(engine, name, at)
        mine = [p for p in found.points if p["run_id"] == run_id]
        assert [(p["quality"], p["requests"], p["weights"]) for p in mine] == [
            (0.91, 7, {"a": 1.0})
        ]
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(CycleRun).where(CycleRun.id == run_id))
