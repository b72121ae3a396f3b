"""A cycle run on the real Redis and database: from `requests` rows to published
weights, stored runs and decisions, raised alerts, decided experiments, rollback, and
one run at a time across workers.

Each test has its own routes (named for it), Redis prefix and rows, removed after.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.variants import parse_plan, variants_key
from app.observability.anomaly import Thresholds
from app.routing.config import RoutesFile
from app.routing.weights import weights_key
from app.store.cycle_lock import claim, release
from app.store.cycle_runs import get_run
from app.store.experiments import create_experiment, create_variant, get_experiment, get_variant
from app.store.schema import (
    Alert,
    CycleDecision,
    Experiment,
    PromptVariant,
    RequestRow,
)
from tests.conftest import routes_for
from workers.cycle_run import CycleRunner
from workers.tasks.alerts import AlertConfig, AlertLoop


@dataclass
class Scene:
    route: str
    prefix: str
    settings: Settings
    routes: RoutesFile
    now: datetime


def _mock(name: str, cost: float) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "mock",
        "model": name,
        "input_cost_per_1k": cost,
        "output_cost_per_1k": cost,
    }


@pytest.fixture
async def scene(
    engine: AsyncEngine, redis: Redis, key_prefix: str, make_settings: Callable[..., Settings]
) -> AsyncIterator[Scene]:
    route = f"cy-{uuid.uuid4().hex[:8]}"
    prefix = f"{key_prefix}cy{uuid.uuid4().hex[:6]}:"
    settings = make_settings(flywheel_redis_prefix=prefix, flywheel_policy="quality_optimized")
    routes = routes_for(
        **{
            route: {
                "strategy": "adaptive",
                "deployments": [_mock("good", 0.001), _mock("poor", 0.001)],
            }
        }
    )
    yield Scene(route, prefix, settings, routes, datetime.now(UTC))
    async with engine.begin() as conn:
        await conn.execute(delete(RequestRow).where(RequestRow.route == route))
        await conn.execute(delete(Alert).where(Alert.route == route))
        await conn.execute(delete(CycleDecision).where(CycleDecision.route == route))
        await conn.execute(delete(Experiment).where(Experiment.route == route))
        await conn.execute(delete(PromptVariant).where(PromptVariant.route == route))
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)


def rows(
    scene: Scene,
    deployment: str,
    quality: float,
    n: int,
    *,
    since_s: float,
    until_s: float = 60.0,
    variant: str | None = None,
    seed: int = 0,
    base: datetime | None = None,
) -> list[dict[str, Any]]:
    """n answers spread between `since_s` and `until_s` seconds before `base` (the
    scene's now), each scored 1 with probability `quality` (else 0)."""
    rng = random.Random(seed)
    base = base or scene.now
    out = []
    for i in range(n):
        ago = since_s - (since_s - until_s) * (i + 0.5) / n
        out.append(
            {
                "id": f"t-{uuid.uuid4().hex}",
                "created_at": base - timedelta(seconds=ago),
                "endpoint": "chat.completions",
                "route": scene.route,
                "deployment": deployment,
                "variant": variant,
                "status": 200,
                "latency_ms": 100.0,
                "cost": 0.001,
                "cache_tier": "miss",
                "quality_score": 1.0 if rng.random() < quality else 0.0,
            }
        )
    return out


async def add(engine: AsyncEngine, batch: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(RequestRow), batch)


def runner(
    scene: Scene, redis: Redis, engine: AsyncEngine, alerts: AlertLoop | None = None
) -> CycleRunner:
    return CycleRunner(scene.settings, scene.routes, redis, engine, alerts, random.Random(7))


async def test_run_publishes_weights_and_stores_itself(
    scene: Scene, redis: Redis, engine: AsyncEngine
) -> None:
    await add(engine, rows(scene, "good", 0.97, 400, since_s=3 * 3600, seed=1))
    await add(engine, rows(scene, "poor", 0.60, 400, since_s=3 * 3600, seed=2))
    alerts = AlertLoop(
        redis,
        engine,
        AlertConfig(scene.prefix, 30.0, 300.0, 3600.0, 900.0, Thresholds(min_samples=20)),
    )
    result = await runner(scene, redis, engine, alerts).run("manual", "job-1")

    raw = await redis.hgetall(weights_key(scene.prefix, scene.route))  # type: ignore[misc]
    weights = {k.decode(): float(v) for k, v in raw.items()}
    assert weights["good"] > 0.9 > weights["poor"] > 0  # the floor keeps it measured
    run = await get_run(engine, result["run_id"])
    assert run is not None
    assert run["status"] == "completed"
    assert run["trigger"] == "manual"
    figures = run["routes"][scene.route]
    assert figures["requests"] == 800
    assert 0.7 < figures["quality"] < 0.85
    assert figures["weights"] == pytest.approx(weights, abs=1e-5)
    assert {a["kind"] for a in run["actions"]} == {"reweight"}
    # The route as a whole is under its critical threshold: a stored alert.
    kinds = {f["kind"] for f in run["findings"]}
    assert "quality_critical" in kinds
    async with engine.connect() as conn:
        stored = (await conn.execute(select(Alert.kind).where(Alert.route == scene.route))).all()
    assert ("quality_critical",) in stored
    # Its state (budgets, when it ran) is kept for the next run.
    state = orjson.loads(await redis.hget(f"{scene.prefix}cycle:state", scene.route))  # type: ignore[misc]
    assert state["last_run_at"] == pytest.approx(run_started(run), abs=5)


def run_started(run: dict[str, Any]) -> float:
    return datetime.fromisoformat(run["started_at"]).timestamp()


async def test_one_run_at_a_time(scene: Scene, redis: Redis) -> None:
    assert await claim(redis, scene.prefix, "job-a") is None
    assert await claim(redis, scene.prefix, "job-b") == "job-a"
    assert not await release(redis, scene.prefix, "job-b")  # only its holder frees it
    assert await release(redis, scene.prefix, "job-a")
    assert await claim(redis, scene.prefix, "job-b") is None


async def test_a_claim_racing_a_release_names_a_holder_or_takes_it(
    scene: Scene, redis: Redis
) -> None:
    """A trigger answers with the holder's job id: a claim that loses to a holder which
    releases at that moment must take the cycle or name the holder, never no one."""
    for i in range(50):
        assert await claim(redis, scene.prefix, f"a-{i}") is None
        got, _ = await asyncio.gather(
            claim(redis, scene.prefix, f"b-{i}"), release(redis, scene.prefix, f"a-{i}")
        )
        assert got in (None, f"a-{i}")
        await release(redis, scene.prefix, f"b-{i}")


async def test_experiment_promotes_then_rolls_back(
    scene: Scene, redis: Redis, engine: AsyncEngine
) -> None:
    started = scene.now - timedelta(hours=6)
    variant = await create_variant(
        engine,
        started,
        route=scene.route,
        name="concise",
        system_prompt="Be brief.",
        params={},
        source="admin",
    )
    vid = variant["id"]
    exp = await create_experiment(
        engine,
        started,
        route=scene.route,
        control="baseline",
        arms={"baseline": 0.5, vid: 0.5},
        origin="admin",
    )
    # A clear winner: 0.95 against 0.75, 1,500 answers each since the start.
    await add(engine, rows(scene, "good", 0.75, 1500, since_s=5 * 3600, variant="baseline", seed=3))
    await add(engine, rows(scene, "good", 0.95, 1500, since_s=5 * 3600, variant=vid, seed=4))
    first = await runner(scene, redis, engine).run("manual", None)
    decided = await get_experiment(engine, exp["id"])
    assert decided is not None
    assert decided["status"] == "watching"
    assert decided["winner"] == vid
    assert decided["decision"]["comparisons"][0]["difference"]["low"] > 0.02
    assert (await get_variant(engine, vid) or {})["status"] == "promoted"
    plan = parse_plan(await redis.get(variants_key(scene.prefix, scene.route)))
    assert [a.variant for a in plan.arms] == [vid]
    assert plan.arms[0].system_prompt == "Be brief."
    run = await get_run(engine, first["run_id"])
    assert run is not None
    assert [a["kind"] for a in run["actions"] if a["kind"] != "reweight"] == ["promote"]

    # After the promotion the winner falls well below the old baseline: rolled back.
    promoted_at = datetime.fromisoformat(decided["watch"]["promoted_at"])
    later = promoted_at + timedelta(seconds=1)
    await add(
        engine,
        rows(scene, "good", 0.5, 2500, since_s=0.9, until_s=0.1, variant=vid, seed=5, base=later),
    )
    await asyncio.sleep(max(0.0, (later - datetime.now(UTC)).total_seconds()) + 0.1)
    await runner(scene, redis, engine).run("manual", None)
    ended = await get_experiment(engine, exp["id"])
    assert ended is not None
    assert ended["status"] == "rolled_back"
    assert (await get_variant(engine, vid) or {})["status"] == "rolled_back"
    assert await redis.get(variants_key(scene.prefix, scene.route)) is None  # baseline again
    async with engine.connect() as conn:
        outcomes = (
            await conn.execute(
                select(CycleDecision.kind, CycleDecision.outcome).where(
                    CycleDecision.route == scene.route, CycleDecision.kind != "reweight"
                )
            )
        ).all()
    assert set(outcomes) >= {
        ("promote", "failure"),  # settled by the watch that rolled it back
        ("rollback", "n/a"),
        ("experiment_admin", "failure"),
    }


async def test_a_candidate_variants_answers_do_not_count_against_its_deployment(
    scene: Scene, redis: Redis, engine: AsyncEngine
) -> None:
    await add(engine, rows(scene, "good", 0.97, 400, since_s=3 * 3600, seed=6))
    await add(engine, rows(scene, "poor", 0.85, 400, since_s=3 * 3600, seed=7))
    # A bad candidate variant that happened to be served by "good": the variant's
    # failure, not the deployment's.
    await add(engine, rows(scene, "good", 0.1, 400, since_s=3 * 3600, variant="var_bad", seed=8))
    result = await runner(scene, redis, engine).run("manual", None)
    raw = await redis.hgetall(weights_key(scene.prefix, scene.route))  # type: ignore[misc]
    assert float(raw[b"good"]) > 0.9
    run = await get_run(engine, result["run_id"])
    assert run is not None
    figures = run["routes"][scene.route]
    assert figures["deployments"]["good"]["quality"] > 0.9
    assert figures["variants"]["var_bad"]["quality"] < 0.2  # still reported per variant
