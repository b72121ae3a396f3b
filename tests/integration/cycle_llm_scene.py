"""What the cycle's LLM tests share: a scene of routes (one served by the mock provider,
a judge and an optimizer route on the fake OpenAI upstream), rows with stored bodies,
and a runner with the worker's own caller (`workers.llm_calls`).

Each scene has its own routes (named for it) and Redis prefix; its rows, decisions,
experiments, variants and keys are removed after.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from redis.asyncio import Redis
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.routing.config import RoutesFile
from app.store.schema import (
    CycleDecision,
    Experiment,
    PromptVariant,
    RequestBody,
    RequestRow,
)
from tests.conftest import openai_route, routes_for
from tests.fakes.server import FakeServer
from workers.cycle_run import CycleRunner
from workers.llm_calls import LLMCalls

KEY = "sk-test-secret-0123456789"
MOCK: dict[str, Any] = {"deployments": [{"name": "m", "provider": "mock", "model": "m"}]}


@dataclass
class Scene:
    route: str  # served by the mock provider; its rows are what gets judged/optimized
    other: str
    judge: str
    optimizer: str
    prefix: str
    routes: RoutesFile
    now: datetime
    make: Callable[..., Settings]

    def settings(self, **overrides: Any) -> Settings:
        return self.make(flywheel_redis_prefix=self.prefix, openai_api_key=KEY, **overrides)


@asynccontextmanager
async def scene_of(
    engine: AsyncEngine,
    redis: Redis,
    key_prefix: str,
    make_settings: Callable[..., Settings],
    fake: FakeServer,
) -> AsyncIterator[Scene]:
    tag = uuid.uuid4().hex[:8]
    names = [f"cl-{tag}", f"cl2-{tag}", f"judge-{tag}", f"opt-{tag}"]
    route, other, judge, optimizer = names
    routes = routes_for(
        **{
            route: MOCK,
            other: MOCK,
            judge: openai_route(fake.url, "judge"),
            optimizer: openai_route(fake.url, "optimizer"),
        }
    )
    prefix = f"{key_prefix}cl{tag}:"
    try:
        yield Scene(
            route, other, judge, optimizer, prefix, routes, datetime.now(UTC), make_settings
        )
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(RequestRow).where(RequestRow.route.in_(names)))
            await conn.execute(delete(RequestBody).where(RequestBody.route.in_(names)))
            await conn.execute(delete(CycleDecision).where(CycleDecision.route.in_(names)))
            await conn.execute(delete(Experiment).where(Experiment.route.in_(names)))
            await conn.execute(delete(PromptVariant).where(PromptVariant.route.in_(names)))
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)


class Callers:
    """The worker callers a test opened, closed after it."""

    def __init__(self) -> None:
        self.opened: list[LLMCalls] = []

    def open(self, settings: Settings, routes: RoutesFile) -> LLMCalls:
        llm = LLMCalls.open(settings, routes)
        assert llm is not None
        self.opened.append(llm)
        return llm

    async def close(self) -> None:
        for llm in self.opened:
            await llm.close()


def row(
    scene: Scene,
    route: str,
    ago_s: float,
    quality: float,
    *,
    variant: str | None = None,
    source: str = "rules",
    rid: str | None = None,
) -> dict[str, Any]:
    return {
        "id": rid or f"t-{uuid.uuid4().hex}",
        "created_at": scene.now - timedelta(seconds=ago_s),
        "endpoint": "chat.completions",
        "route": route,
        "deployment": "m",
        "variant": variant,
        "status": 200,
        "latency_ms": 100.0,
        "cost": 0.001,
        "cache_tier": "miss",
        "quality_score": quality,
        "quality_source": source,
        "quality_reasons": ["feedback"] if source == "feedback" else [],
    }


def body(r: dict[str, Any], question: str, answer: str) -> dict[str, Any]:
    request = {
        "model": r["route"],
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": question},
        ],
    }
    response = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
    }
    return {
        "request_id": r["id"],
        "created_at": r["created_at"],
        "expires_at": r["created_at"] + timedelta(days=7),
        "route": r["route"],
        "request": orjson.dumps(request).decode(),
        "response": orjson.dumps(response).decode(),
    }


async def add(
    engine: AsyncEngine, rows: list[dict[str, Any]], bodies: list[dict[str, Any]] | None = None
) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(RequestRow), rows)
        if bodies:
            await conn.execute(insert(RequestBody), bodies)


def traffic(scene: Scene, route: str, quality: float, n: int, seed: int) -> list[dict[str, Any]]:
    """n scored answers over the last 3 hours: the evidence a plan's findings need."""
    rng = random.Random(seed)
    return [
        row(scene, route, 3 * 3600 * (i + 0.5) / n + 120, 1.0 if rng.random() < quality else 0.0)
        for i in range(n)
    ]


def runner(
    scene: Scene, settings: Settings, redis: Redis, engine: AsyncEngine, llm: LLMCalls
) -> CycleRunner:
    return CycleRunner(settings, scene.routes, redis, engine, None, random.Random(7), llm=llm)


def seen(fake: FakeServer, model: str, since: int) -> list[dict[str, Any]]:
    bodies = [s.body for s in fake.seen[since:]]
    return [b for b in bodies if isinstance(b, dict) and b.get("model") == model]


async def quality_of(engine: AsyncEngine, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    r = RequestRow
    async with engine.connect() as conn:
        found = await conn.execute(
            select(r.id, r.quality_source, r.quality_score, r.quality_reasons).where(r.id.in_(ids))
        )
    return {str(x[0]): tuple(x[1:]) for x in found.all()}
