"""The cycle's LLM judge on the real Redis and database, calling the fake OpenAI
upstream through the worker's own router (`workers.llm_calls`); and that router itself,
as the worker builds it at startup.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.observability.tracing import make_tracing
from app.routing.config import RoutesFile
from app.store.cycle_lock import next_key
from app.store.cycle_runs import get_run
from tests.conftest import openai_route, routes_for
from tests.fakes.server import FakeServer
from tests.integration.cycle_llm_scene import (
    MOCK,
    Callers,
    Scene,
    add,
    body,
    quality_of,
    row,
    runner,
    scene_of,
    seen,
)
from workers.context import CTX_KEY, WorkerContext
from workers.cycle_judge import sampled
from workers.cycle_run import CycleRunner
from workers.llm_calls import JUDGE_TAG, LLMCalls
from workers.tasks import cycle


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


async def test_judge_scores_the_sample_and_nothing_else(
    scene: Scene,
    redis: Redis,
    engine: AsyncEngine,
    openai_upstream: FakeServer,
    llm_for: Callable[[Settings, RoutesFile], LLMCalls],
) -> None:
    settings = scene.settings(flywheel_judge_route=scene.judge, flywheel_judge_sample=0.5)
    answers = [row(scene, scene.route, 200 - i, 1.0) for i in range(40)]
    own = [row(scene, scene.judge, 200 - i, 1.0) for i in range(10)]  # the judge's route
    bare = [row(scene, scene.route, 100, 1.0) for _ in range(5)]  # no stored bodies
    fed_id = next(i for i in (f"t-{uuid.uuid4().hex}" for _ in range(100)) if sampled(i, 0.5))
    fed = row(scene, scene.route, 150, 0.1, source="feedback", rid=fed_id)
    stored = [body(r, f"question {r['id']}", "an answer") for r in [*answers, *own, fed]]
    await add(engine, [*answers, *own, *bare, fed], stored)
    mark = len(openai_upstream.seen)

    result = await runner(scene, settings, redis, engine, llm_for(settings, scene.routes)).run(
        "manual", None
    )

    expected = {r["id"] for r in answers if sampled(r["id"], 0.5)}
    assert 5 < len(expected) < 35
    after = await quality_of(engine, [r["id"] for r in [*answers, *own, *bare, fed]])
    judged = {rid for rid, (source, _, _) in after.items() if source == "judge"}
    assert judged == expected
    assert all(after[rid] == ("judge", 0.8, ["judge: Correct and clear."]) for rid in judged)
    assert all(after[r["id"]][0] == "rules" for r in [*own, *bare])
    assert after[fed_id][:2] == ("feedback", 0.1)  # feedback is never overwritten
    calls = seen(openai_upstream, "judge", mark)
    assert len(calls) == len(expected)
    assert {c["user"] for c in calls} == {JUDGE_TAG}
    shown = " ".join(c["messages"][1]["content"] for c in calls)
    assert all(f"question {rid}" in shown for rid in expected)
    assert "Be terse." not in shown  # the judge never sees the system prompt
    run = await get_run(engine, result["run_id"])
    assert run is not None
    tally = run["routes"][scene.route]["judge"]
    assert tally["sampled"] == tally["scored"] == len(expected)
    assert tally["failed"] == tally["unreadable"] == 0
    assert tally["cost"] > 0
    assert scene.judge not in run["routes"] or "judge" not in run["routes"][scene.judge]

    # The next run finds nothing left to judge: judged rows are no longer the rules'.
    mark = len(openai_upstream.seen)
    await runner(scene, settings, redis, engine, llm_for(settings, scene.routes)).run(
        "manual", None
    )
    assert seen(openai_upstream, "judge", mark) == []


async def test_a_failing_judge_leaves_the_rules_score(
    scene: Scene,
    redis: Redis,
    engine: AsyncEngine,
    openai_upstream: FakeServer,
    llm_for: Callable[[Settings, RoutesFile], LLMCalls],
) -> None:
    failing = f"{scene.judge}-down"
    routes = routes_for(
        **{
            scene.route: MOCK,
            failing: {**openai_route(openai_upstream.url, "fail-500"), "retries": 0},
        }
    )
    settings = scene.settings(flywheel_judge_route=failing, flywheel_judge_sample=1.0)
    answers = [row(scene, scene.route, 100 + i, 1.0) for i in range(3)]
    await add(engine, answers, [body(r, "q", "a") for r in answers])

    runner_ = CycleRunner(settings, routes, redis, engine, None, llm=llm_for(settings, routes))
    result = await runner_.run("manual", None)

    after = await quality_of(engine, [r["id"] for r in answers])
    assert {source for source, _, _ in after.values()} == {"rules"}
    run = await get_run(engine, result["run_id"])
    assert run is not None
    tally = run["routes"][scene.route]["judge"]
    assert tally["sampled"] == tally["failed"] == 3
    assert tally["scored"] == 0


async def test_worker_calls_route_retry_and_fall_back_like_the_gateway(
    scene: Scene, openai_upstream: FakeServer
) -> None:
    routes = routes_for(
        primary={**openai_route(openai_upstream.url, "fail-503"), "fallbacks": ["backup"]},
        backup=openai_route(openai_upstream.url, "judge"),
    )
    settings = scene.settings(flywheel_judge_route="primary")
    llm = LLMCalls.open(settings, routes)
    assert llm is not None
    assert set(llm.router.routes) == {"primary", "backup"}  # what the judge can reach
    mark = len(openai_upstream.seen)
    try:
        answer = await llm.complete(
            "primary", [{"role": "user", "content": "hi"}], tag=JUDGE_TAG, timeout_s=10
        )
    finally:
        await llm.close()
    assert answer.route == "backup"
    assert answer.attempts == 4  # the primary's first try and 2 retries, then the backup
    assert "Correct and clear." in answer.text
    assert answer.cost > 0
    sent = [s.body for s in openai_upstream.seen[mark:]]
    assert [b["model"] for b in sent] == ["fail-503"] * 3 + ["judge"]
    assert {b["user"] for b in sent} == {JUDGE_TAG}


# -- the worker's caller ------------------------------------------------------------


async def test_the_worker_builds_its_caller_at_startup_and_closes_it(
    scene: Scene,
    redis: Redis,
    engine: AsyncEngine,
    openai_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "routes": {
                    scene.route: MOCK,
                    scene.judge: openai_route(openai_upstream.url, "judge"),
                }
            }
        )
    )
    # No scheduled run during the test: the next one is an hour away.
    await redis.set(next_key(scene.prefix), time.time() + 3600)

    async def started(settings: Settings) -> dict[str, Any]:
        tracing = make_tracing("test-worker", None, None)
        ctx: dict[str, Any] = {"redis": redis}
        ctx[CTX_KEY] = WorkerContext(settings=settings, engine=engine, tracing=tracing)
        await cycle.on_startup(ctx)
        return ctx

    ctx = await started(scene.settings(flywheel_config=config, flywheel_judge_route=scene.judge))
    llm = ctx[cycle.LLM_KEY]
    assert isinstance(llm, LLMCalls)
    assert list(llm.router.routes) == [scene.judge]  # only what the worker calls
    assert cycle._runner(ctx).llm is llm
    await cycle.on_shutdown(ctx)
    assert llm.closed
    assert cycle.LLM_KEY not in ctx

    ctx = await started(scene.settings(flywheel_config=config))  # neither configured
    assert ctx[cycle.LLM_KEY] is None
    assert cycle._runner(ctx).llm is None
    await cycle.on_shutdown(ctx)
