"""The virtuous cycle's admin endpoints through `create_app`, without a worker: the master
key, trigger (one run at a time), runs, status, prompt variants and experiments.

Each test has its own Redis prefix and route names; the rows it adds are removed after.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.variants import parse_plan, variants_key
from app.main import create_app
from app.routing.weights import weights_key
from app.store.cycle_lock import current_key
from app.store.cycle_runs import finish_run, start_run
from app.store.schema import CycleRun, Experiment, PromptVariant
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served, create_key, routes_for

MASTER = "sk-master-cycle-api-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
CYCLE = "/v1/virtuous-cycle"


def mock(name: str, weight: float = 1.0) -> dict[str, Any]:
    return {"name": name, "provider": "mock", "model": name, "weight": weight}


@dataclass
class Rig:
    gw: Served
    client: httpx.AsyncClient
    prefix: str
    adaptive: str  # an adaptive route with its own thresholds
    plain: str  # a priority route
    ensemble: str


@pytest.fixture
def prefix(own_prefix: str) -> str:
    return own_prefix


@pytest.fixture
async def rig(
    make_settings: Callable[..., Settings], prefix: str, engine: AsyncEngine
) -> AsyncIterator[Rig]:
    tag = uuid.uuid4().hex[:8]
    adaptive, plain, ensemble = f"cyc-a-{tag}", f"cyc-p-{tag}", f"cyc-e-{tag}"
    spec: dict[str, dict[str, Any]] = {
        adaptive: {
            "strategy": "adaptive",
            "deployments": [mock("fast", 3), mock("smart", 1)],
            "cycle": {"critical": 0.7, "warning": 0.8, "target": 0.9},
        },
        plain: {"strategy": "priority", "deployments": [mock("only")]},
        ensemble: {"ensemble": {"strategy": "first_success", "members": [adaptive, plain]}},
    }
    routes = routes_for(**spec)
    settings = make_settings(flywheel_master_key=MASTER, flywheel_redis_prefix=prefix)
    async with (
        Served(create_app(settings, routes)) as gw,
        httpx.AsyncClient(base_url=gw.url + CYCLE, headers=ADMIN, timeout=10) as client,
    ):
        yield Rig(gw, client, prefix, adaptive, plain, ensemble)
    async with engine.begin() as conn:
        for table in (Experiment, PromptVariant):
            await conn.execute(delete(table).where(table.route.in_([adaptive, plain])))


async def test_every_cycle_endpoint_needs_the_master_key(rig: Rig) -> None:
    virtual = (await create_key(rig.gw.url, MASTER, name="not-admin"))["key"]
    calls = [
        ("GET", "/status"),
        ("POST", "/trigger"),
        ("GET", "/runs"),
        ("GET", "/runs/run_x"),
        ("GET", "/variants"),
        ("POST", "/variants"),
        ("GET", "/experiments"),
        ("POST", "/experiments"),
        ("GET", f"/datasets?route={rig.adaptive}"),
    ]
    async with httpx.AsyncClient(base_url=rig.gw.url + CYCLE, timeout=10) as anon:
        for method, path in calls:
            for headers in ({}, {"authorization": f"Bearer {virtual}"}):
                resp = await anon.request(method, path, headers=headers, json={})
                assert_openai_error(resp, 401, "authentication_error")


async def test_trigger_queues_one_run_and_answers_with_the_holder(rig: Rig, redis: Redis) -> None:
    first = await rig.client.post("/trigger")
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["object"] == "cycle.job"
    assert job["id"].startswith("cycle-")
    assert (job["status"], job["already_running"]) == ("queued", False)
    assert job["url"] == f"/admin/jobs/{job['id']}"
    # No worker here: the queued run holds the cycle, so a second trigger joins it.
    again = (await rig.client.post("/trigger")).json()
    assert (again["id"], again["already_running"]) == (job["id"], True)
    # Whoever holds the cycle (a scheduled run, say) is the one the trigger names.
    await redis.set(current_key(rig.prefix), "schedule-held-by-test")
    held = await rig.client.post("/trigger")
    assert held.status_code == 202
    assert held.json()["id"] == "schedule-held-by-test"
    assert held.json()["already_running"] is True
    assert held.json()["status"] == "in_progress"  # not an arq job of its own


async def test_runs_newest_first_with_paging_and_unknown_run(rig: Rig, engine: AsyncEngine) -> None:
    # Runs of a year nobody else uses: pages are exactly these, whatever else the
    # session's database holds.
    base = datetime(2001, 1, 1, tzinfo=UTC)
    ids = [f"run_cycapi{uuid.uuid4().hex[:16]}" for _ in range(3)]
    for i, run_id in enumerate(ids):
        at = base + timedelta(minutes=i)
        await start_run(engine, run_id, at, "manual", None)
        finding = {"route": rig.adaptive, "kind": "quality_drop"}
        await finish_run(
            engine,
            run_id,
            at + timedelta(seconds=5),
            status="completed",
            routes={rig.adaptive: {"quality": 0.9}},
            findings=[finding],
        )
    try:
        before = (base + timedelta(hours=1)).isoformat()
        page = (await rig.client.get("/runs", params={"limit": 2, "before": before})).json()
        assert [r["id"] for r in page["data"]] == [ids[2], ids[1]]
        assert page["has_more"] is True
        assert page["data"][0]["findings"] == 1  # a count in the listing
        after = page["data"][-1]["started_at"]
        rest = (await rig.client.get("/runs", params={"limit": 2, "before": after})).json()
        assert [r["id"] for r in rest["data"]] == [ids[0]]
        assert rest["has_more"] is False
        one = (await rig.client.get(f"/runs/{ids[0]}")).json()
        assert one["routes"] == {rig.adaptive: {"quality": 0.9}}
        assert one["findings"] == [{"route": rig.adaptive, "kind": "quality_drop"}]
        missing = await rig.client.get("/runs/run_" + "0" * 24)
        assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == (
            "run_not_found"
        )
        bad = await rig.client.get("/runs", params={"limit": 0})
        assert_openai_error(bad, 400, "invalid_request_error")
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(CycleRun).where(CycleRun.id.in_(ids)))


async def test_status_shows_routes_thresholds_and_where_weights_come_from(
    rig: Rig, redis: Redis
) -> None:
    status = (await rig.client.get("/status")).json()
    assert status["object"] == "cycle.status"
    assert status["policy"] in ("cost_optimized", "balanced", "quality_optimized")
    routes = status["routes"]
    assert {rig.adaptive, rig.plain} <= set(routes)
    assert rig.ensemble not in routes  # ensembles have no deployments of their own
    adaptive = routes[rig.adaptive]
    assert adaptive["thresholds"] == {"critical": 0.7, "warning": 0.8, "target": 0.9}
    assert routes[rig.plain]["thresholds"] == {"critical": 0.85, "warning": 0.9, "target": 0.95}
    assert (adaptive["weights"], adaptive["weights_source"]) == (
        {"fast": 3.0, "smart": 1.0},
        "config",
    )
    for key in ("strategy", "quality", "trend_per_h", "requests", "experiments", "open_alerts"):
        assert key in adaptive
    learned_weights: dict[str | bytes, float] = {"fast": 0.2, "smart": 0.8}
    await redis.hset(weights_key(rig.prefix, rig.adaptive), mapping=learned_weights)  # type: ignore[misc]
    learned = (await rig.client.get("/status")).json()["routes"][rig.adaptive]
    assert (learned["weights"], learned["weights_source"]) == (
        {"fast": 0.2, "smart": 0.8},
        "cycle",
    )


async def test_variants_create_list_get_and_retire(rig: Rig) -> None:
    spec = {"route": rig.adaptive, "name": "concise", "system_prompt": "Be concise."}
    created = await rig.client.post("/variants", json=spec | {"params": {"temperature": 0.2}})
    assert created.status_code == 201, created.text
    variant = created.json()
    assert variant["id"].startswith("var_")
    assert (variant["status"], variant["source"]) == ("candidate", "admin")
    assert variant["params"] == {"temperature": 0.2}
    nothing = await rig.client.post("/variants", json={"route": rig.adaptive, "name": "same"})
    assert_openai_error(nothing, 400, "invalid_request_error")
    unknown = await rig.client.post("/variants", json=spec | {"route": "no-such-route"})
    assert assert_openai_error(unknown, 404, "invalid_request_error")["code"] == "route_not_found"
    ensemble = await rig.client.post("/variants", json=spec | {"route": rig.ensemble})
    assert_openai_error(ensemble, 404, "invalid_request_error")
    bad = await rig.client.post("/variants", json=spec | {"params": {"temperature": 9}})
    assert assert_openai_error(bad, 400, "invalid_request_error")["param"] == "params"
    listed = (await rig.client.get("/variants", params={"route": rig.adaptive})).json()
    assert [v["id"] for v in listed["data"]] == [variant["id"]]
    assert (await rig.client.get(f"/variants/{variant['id']}")).json() == variant
    missing = await rig.client.get("/variants/var_" + "0" * 24)
    assert_openai_error(missing, 404, "invalid_request_error")
    retired = await rig.client.post(f"/variants/{variant['id']}/retire")
    assert retired.status_code == 200, retired.text
    assert retired.json()["status"] == "retired"
    assert retired.json()["plan_published"] is True


async def _variant(rig: Rig, name: str, route: str | None = None) -> str:
    spec = {"route": route or rig.adaptive, "name": name, "system_prompt": f"You are {name}."}
    resp = await rig.client.post("/variants", json=spec)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def test_experiment_publishes_its_plan_and_stop_removes_it(rig: Rig, redis: Redis) -> None:
    a, b = await _variant(rig, "a"), await _variant(rig, "b")
    spec = {"route": rig.adaptive, "variants": [a, b], "traffic_share": 0.4}
    created = await rig.client.post("/experiments", json=spec)
    assert created.status_code == 201, created.text
    exp = created.json()
    assert (exp["status"], exp["control"], exp["plan_published"]) == ("running", "baseline", True)
    assert exp["arms"] == pytest.approx({"baseline": 0.6, a: 0.2, b: 0.2})
    plan = parse_plan(await redis.get(variants_key(rig.prefix, rig.adaptive)))
    assert plan.experiment == exp["id"]
    shares = {arm.variant: arm.share for arm in plan.arms}
    assert shares == pytest.approx({"baseline": 0.6, a: 0.2, b: 0.2})
    prompts = {arm.variant: arm.system_prompt for arm in plan.arms}
    assert prompts == {"baseline": None, a: "You are a.", b: "You are b."}
    # Under test: not retired on its own, and no second experiment on the route.
    busy = await rig.client.post(f"/variants/{a}/retire")
    assert assert_openai_error(busy, 409, "invalid_request_error")["code"] == "conflict"
    c = await _variant(rig, "c")
    second = await rig.client.post("/experiments", json={"route": rig.adaptive, "variants": [c]})
    assert_openai_error(second, 409, "invalid_request_error")

    running = (await rig.client.get("/experiments", params={"status": "running"})).json()
    assert exp["id"] in [e["id"] for e in running["data"]]
    stopped_list = (await rig.client.get("/experiments", params={"status": "stopped"})).json()
    assert exp["id"] not in [e["id"] for e in stopped_list["data"]]
    got = (await rig.client.get(f"/experiments/{exp['id']}")).json()
    assert got["arms"] == exp["arms"]

    stopped = await rig.client.post(f"/experiments/{exp['id']}/stop")
    assert stopped.status_code == 200, stopped.text
    assert (stopped.json()["status"], stopped.json()["plan_published"]) == ("stopped", True)
    assert stopped.json()["ended_at"] is not None
    for vid in (a, b):
        assert (await rig.client.get(f"/variants/{vid}")).json()["status"] == "retired"
    assert await redis.get(variants_key(rig.prefix, rig.adaptive)) is None
    again = await rig.client.post(f"/experiments/{exp['id']}/stop")
    assert_openai_error(again, 409, "invalid_request_error")
    by_status = (await rig.client.get("/experiments", params={"status": "stopped"})).json()
    assert exp["id"] in [e["id"] for e in by_status["data"]]


async def test_experiment_refuses_unknown_and_non_candidate_variants(rig: Rig) -> None:
    unknown = "var_" + "0" * 24
    resp = await rig.client.post(
        "/experiments", json={"route": rig.adaptive, "variants": [unknown]}
    )
    code = assert_openai_error(resp, 404, "invalid_request_error")["code"]
    assert code == "variant_not_found"
    # A variant of another route is not one of this route's.
    other = await _variant(rig, "elsewhere", rig.plain)
    resp = await rig.client.post("/experiments", json={"route": rig.adaptive, "variants": [other]})
    assert_openai_error(resp, 404, "invalid_request_error")
    retired = await _variant(rig, "old")
    await rig.client.post(f"/variants/{retired}/retire")
    resp = await rig.client.post(
        "/experiments", json={"route": rig.adaptive, "variants": [retired]}
    )
    assert assert_openai_error(resp, 409, "invalid_request_error")["code"] == "conflict"
    resp = await rig.client.post("/experiments", json={"route": "no-such", "variants": [retired]})
    assert_openai_error(resp, 404, "invalid_request_error")
    missing = await rig.client.get("/experiments/exp_" + "0" * 24)
    assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == (
        "experiment_not_found"
    )
    bad = await rig.client.post("/experiments", json={"route": rig.adaptive, "variants": []})
    assert_openai_error(bad, 400, "invalid_request_error")
