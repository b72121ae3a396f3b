"""The cycle's candidate prompts on the real Redis and database: the optimizer route on
the fake OpenAI upstream, called through the worker's own router (`workers.llm_calls`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import orjson
import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.variants import parse_plan, variants_key
from app.routing.config import RoutesFile
from app.store.cycle_runs import get_run
from app.store.experiments import (
    create_experiment,
    create_variant,
    list_experiments,
    list_variants,
    set_variant_status,
    update_experiment,
)
from app.store.schema import CycleDecision
from tests.fakes.openai_fake import OPTIMIZER_PROMPTS
from tests.fakes.server import FakeServer
from tests.integration.cycle_llm_scene import (
    Callers,
    Scene,
    add,
    body,
    row,
    runner,
    scene_of,
    seen,
    traffic,
)
from workers.cycle_optimizer import cooldown_key
from workers.llm_calls import OPTIMIZER_TAG, LLMCalls


@pytest.fixture
async def scene(
    engine: AsyncEngine,
    redis: Redis,
    key_prefix: str,
    make_settings: Callable[..., Settings],
    openai_upstream: FakeServer,
) -> AsyncIterator[Scene]:
    async with scene_of(engine, redis, key_prefix, make_settings, openai_upstream) as made:
        yield made


@pytest.fixture
async def llm_for() -> AsyncIterator[Callable[[Settings, RoutesFile], LLMCalls]]:
    callers = Callers()
    yield callers.open
    await callers.close()


async def under_warning(scene: Scene, engine: AsyncEngine, route: str, seed: int) -> None:
    """Quality near 0.8 (under the 0.9 warning), and bad answers with bodies."""
    await add(engine, traffic(scene, route, 0.8, 200, seed))
    bad = [row(scene, route, 300 + i, 0.0) for i in range(6)]
    await add(
        engine,
        bad,
        [body(r, f"mail jane.doe@example.com about {route}", "I can't help.") for r in bad],
    )


async def test_a_route_under_warning_gets_candidates_once_per_cooldown(
    scene: Scene,
    redis: Redis,
    engine: AsyncEngine,
    openai_upstream: FakeServer,
    llm_for: Callable[[Settings, RoutesFile], LLMCalls],
) -> None:
    settings = scene.settings(
        flywheel_optimizer_route=scene.optimizer,
        flywheel_optimizer_candidates=3,
        flywheel_optimizer_traffic_share=0.1,
    )
    llm = llm_for(settings, scene.routes)
    await under_warning(scene, engine, scene.route, seed=1)
    mark = len(openai_upstream.seen)

    result = await runner(scene, settings, redis, engine, llm).run("manual", None)

    (exp,) = await list_experiments(engine, scene.route)
    assert exp["origin"] == "optimizer"
    assert exp["status"] == "running"
    assert exp["control"] == "baseline"
    tested = [v for v in exp["arms"] if v != "baseline"]
    assert len(tested) == 3
    assert exp["arms"]["baseline"] == pytest.approx(0.9)
    assert all(exp["arms"][v] == pytest.approx(0.1 / 3) for v in tested)
    variants = {v["id"]: v for v in await list_variants(engine, scene.route)}
    assert set(variants) == set(tested)
    assert {v["source"] for v in variants.values()} == {"optimizer"}
    assert {v["status"] for v in variants.values()} == {"testing"}
    assert {v["parent"] for v in variants.values()} == {None}
    # The fake's four prompts less the one repeated (case and spacing aside), capped at 3.
    prompts = {v["system_prompt"] for v in variants.values()}
    assert prompts == {OPTIMIZER_PROMPTS[0], OPTIMIZER_PROMPTS[1], OPTIMIZER_PROMPTS[3]}
    plan = parse_plan(await redis.get(variants_key(scene.prefix, scene.route)))
    assert plan.experiment == exp["id"]
    assert {a.variant for a in plan.arms} == {"baseline", *tested}
    # The optimizer was asked once, tagged, with the worst examples masked.
    (call,) = seen(openai_upstream, "optimizer", mark)
    assert call["user"] == OPTIMIZER_TAG
    asked = orjson.loads(call["messages"][1]["content"])
    assert asked["candidates_wanted"] == 3
    assert asked["current_system_prompt"] is None
    assert len(asked["worst_examples"]) == 5
    shown = call["messages"][1]["content"]
    assert "[EMAIL]" in shown
    assert "jane.doe@example.com" not in shown
    run = await get_run(engine, result["run_id"])
    assert run is not None
    (act,) = [a for a in run["actions"] if a["kind"] == "candidates"]
    assert act["subject"] == exp["id"]
    assert act["optimizer"]["cost"] > 0
    async with engine.connect() as conn:
        kinds = (
            await conn.execute(select(CycleDecision.kind).where(CycleDecision.route == scene.route))
        ).scalars()
        assert "candidates" in set(kinds)
    ttl = await redis.ttl(cooldown_key(scene.prefix, scene.route))
    assert 7000 < ttl <= 7200

    # The experiment ends; a run within the cooldown starts no other.
    await update_experiment(engine, exp["id"], status="stopped", ended_at=scene.now)
    second = await runner(scene, settings, redis, engine, llm).run("manual", None)
    assert len(await list_experiments(engine, scene.route)) == 1
    run = await get_run(engine, second["run_id"])
    assert run is not None
    assert run["routes"][scene.route]["optimizer"] == {"status": "cooldown"}

    # Once the cooldown has passed, the next run tries again.
    await redis.delete(cooldown_key(scene.prefix, scene.route))
    await runner(scene, settings, redis, engine, llm).run("manual", None)
    assert len(await list_experiments(engine, scene.route, ("running",))) == 1
    assert len(await list_experiments(engine, scene.route)) == 2


async def test_no_candidates_for_a_route_with_a_live_experiment_or_over_the_limit(
    scene: Scene,
    redis: Redis,
    engine: AsyncEngine,
    openai_upstream: FakeServer,
    llm_for: Callable[[Settings, RoutesFile], LLMCalls],
) -> None:
    settings = scene.settings(
        flywheel_optimizer_route=scene.optimizer, flywheel_optimizer_max_running=1
    )
    llm = llm_for(settings, scene.routes)
    await under_warning(scene, engine, scene.route, seed=2)
    await under_warning(scene, engine, scene.other, seed=3)
    admin = await create_variant(
        engine,
        scene.now,
        route=scene.route,
        name="admin",
        system_prompt="Be kind.",
        params={},
        source="admin",
    )
    await create_experiment(
        engine,
        scene.now,
        route=scene.route,
        control="baseline",
        arms={"baseline": 0.5, admin["id"]: 0.5},
        origin="admin",
    )

    result = await runner(scene, settings, redis, engine, llm).run("manual", None)

    assert [e["origin"] for e in await list_experiments(engine, scene.route)] == ["admin"]
    (started,) = await list_experiments(engine, scene.other)
    assert started["origin"] == "optimizer"
    run = await get_run(engine, result["run_id"])
    assert run is not None
    assert run["routes"][scene.route]["optimizer"] == {"status": "experiment_live"}
    assert await redis.get(cooldown_key(scene.prefix, scene.route)) is None  # not spent

    # The admin experiment ends; the one optimizer experiment running is the limit.
    await update_experiment(
        engine, (await list_experiments(engine, scene.route))[0]["id"], status="stopped"
    )
    second = await runner(scene, settings, redis, engine, llm).run("manual", None)
    assert [e["origin"] for e in await list_experiments(engine, scene.route)] == ["admin"]
    run = await get_run(engine, second["run_id"])
    assert run is not None
    assert run["routes"][scene.route]["optimizer"] == {"status": "max_running"}


async def test_candidates_for_a_promoted_prompt_build_on_it(
    scene: Scene,
    redis: Redis,
    engine: AsyncEngine,
    openai_upstream: FakeServer,
    llm_for: Callable[[Settings, RoutesFile], LLMCalls],
) -> None:
    settings = scene.settings(
        flywheel_optimizer_route=scene.optimizer, flywheel_optimizer_candidates=2
    )
    promoted = await create_variant(
        engine,
        scene.now - timedelta(days=1),
        route=scene.route,
        name="current",
        system_prompt="You answer tax questions.",
        params={"temperature": 0.3},
        source="admin",
    )
    await set_variant_status(engine, [promoted["id"]], "promoted", scene.now - timedelta(days=1))
    await add(engine, traffic(scene, scene.route, 0.8, 200, seed=4))
    old = [row(scene, scene.route, 400 + i, 0.0) for i in range(3)]  # before the promotion
    new = [row(scene, scene.route, 300 + i, 0.2, variant=promoted["id"]) for i in range(3)]
    await add(
        engine,
        [*old, *new],
        [body(r, "OLD-ARM question", "bad") for r in old]
        + [body(r, "CURRENT-ARM question", "meh") for r in new],
    )
    mark = len(openai_upstream.seen)

    await runner(scene, settings, redis, engine, llm_for(settings, scene.routes)).run(
        "manual", None
    )

    (exp,) = await list_experiments(engine, scene.route)
    assert exp["control"] == promoted["id"]
    assert exp["arms"][promoted["id"]] == pytest.approx(0.9)
    candidates = [v for v in await list_variants(engine, scene.route) if v["source"] == "optimizer"]
    assert len(candidates) == 2
    assert {v["parent"] for v in candidates} == {promoted["id"]}
    assert all(v["params"] == {"temperature": 0.3} for v in candidates)
    (call,) = seen(openai_upstream, "optimizer", mark)
    asked = orjson.loads(call["messages"][1]["content"])
    assert asked["current_system_prompt"] == "You answer tax questions."
    shown = call["messages"][1]["content"]
    assert "CURRENT-ARM" in shown
    assert "OLD-ARM" not in shown  # examples come from the arm in use
