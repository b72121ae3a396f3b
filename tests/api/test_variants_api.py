"""Prompt variants through the served gateway: a plan published to Redis reaches every
replica within a refresh and shapes what the fake upstream receives, the response's
`x-flywheel-variant`, the request records and the cache keys."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.cycle.variants import VariantArm, VariantPlan, publish_plan
from app.main import create_app
from app.routing.config import RoutesFile
from tests.api.test_records_api import records
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer, Seen

PROMPT_A = "You are variant A. Answer in one word."
PROMPT_B = "You are variant B. Answer at length."
REFRESH_S = 0.05


@pytest.fixture
def prefix(own_prefix: str) -> str:
    return own_prefix


@pytest.fixture
def settings(make_settings: Callable[..., Settings], prefix: str) -> Settings:
    return make_settings(
        openai_api_key="sk-test-secret-0123456789",
        flywheel_redis_prefix=prefix,
        flywheel_weights_refresh_s=REFRESH_S,
    )


@pytest.fixture
def routes(openai_upstream: FakeServer) -> RoutesFile:
    base = openai_upstream.url
    return routes_for(
        plain=openai_route(base),
        other=openai_route(base),
        cached=openai_route(base) | {"cache": {"mode": "on", "ttl_s": 60}},
        ens={"ensemble": {"strategy": "first_success", "members": ["plain", "other"]}},
    )


@pytest.fixture
async def publish(redis: Redis, prefix: str) -> Callable[..., Awaitable[None]]:
    async def put(route: str, *arms: VariantArm, experiment: str | None = "exp_1") -> None:
        plan = VariantPlan(version=1, experiment=experiment, arms=arms) if arms else None
        await publish_plan(redis, prefix, route, plan)

    return put


async def picked_up(
    gw: Served, route: str, variants: set[str] | None, prompt: str | None = None
) -> float:
    """Seconds until `gw` applies a plan with these variants (and, if given, this prompt
    first) to `route`; None: no plan."""
    started = time.monotonic()
    while time.monotonic() - started < 3:
        plan = gw.state.variants.plans.get(route)
        names = None if plan is None else {a.variant for a in plan.arms}
        if names == variants and (prompt is None or plan.arms[0].system_prompt == prompt):
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{route}: plan {variants} not picked up in 3 s")


def ask(marker: str, model: str = "plain", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "the client's own prompt"},
            {"role": "user", "content": f"question {marker}"},
        ],
        **extra,
    }


async def post(gw: Served, payload: dict[str, Any]) -> httpx.Response:
    resp = await gw.client.post("/v1/chat/completions", json=payload)
    await resp.aread()  # a stream, to its end
    return resp


def received(fake: FakeServer, marker: str) -> list[Seen]:
    """What the upstream received for requests carrying `marker`."""
    return [s for s in fake.seen if marker in orjson.dumps(s.body).decode()]


async def test_a_published_plan_shapes_json_and_streamed_requests_until_deleted(
    settings: Settings,
    routes: RoutesFile,
    publish: Callable[..., Awaitable[None]],
    openai_upstream: FakeServer,
    redis_url: str,
    prefix: str,
) -> None:
    variant = VariantArm("var_a", 1.0, PROMPT_A, {"temperature": 0.3, "tools": []})
    async with Served(create_app(settings, routes)) as gw:
        before = await post(gw, ask(m0 := uuid.uuid4().hex))
        assert "x-flywheel-variant" not in before.headers
        await publish("plain", variant)
        assert await picked_up(gw, "plain", {"var_a"}) < 1.0
        json_resp = await post(gw, ask(m1 := uuid.uuid4().hex, temperature=1.5))
        stream_resp = await post(gw, ask(m2 := uuid.uuid4().hex, stream=True))
        await publish("plain")
        await picked_up(gw, "plain", None)
        after = await post(gw, ask(m3 := uuid.uuid4().hex))
        await gw.state.recorder.flush()
    for resp in (json_resp, stream_resp):
        assert resp.status_code == 200
        assert resp.headers["x-flywheel-variant"] == "var_a"
    assert stream_resp.text.rstrip().endswith("data: [DONE]")
    for marker in (m1, m2):
        (seen,) = received(openai_upstream, marker)
        messages = seen.body["messages"]
        assert messages[0] == {"role": "system", "content": PROMPT_A}
        assert messages[1] == {"role": "user", "content": f"question {marker}"}
        assert len(messages) == 2
        assert seen.body["temperature"] == 0.3  # the variant's, over the client's 1.5
        assert "tools" not in seen.body  # not a sampling parameter: ignored
    assert "x-flywheel-variant" not in after.headers
    for marker in (m0, m3):  # without a plan: the client's request as it came
        (seen,) = received(openai_upstream, marker)
        assert seen.body["messages"] == ask(marker)["messages"]
        assert "temperature" not in seen.body
    got = await records(redis_url, prefix)
    variants = [got[r.headers["x-request-id"]]["variant"] for r in (before, json_resp, after)]
    assert variants == [None, "var_a", None]
    assert got[stream_resp.headers["x-request-id"]]["variant"] == "var_a"


async def test_a_users_arm_is_sticky_and_users_spread_over_the_arms(
    settings: Settings,
    routes: RoutesFile,
    publish: Callable[..., Awaitable[None]],
    openai_upstream: FakeServer,
) -> None:
    async with Served(create_app(settings, routes)) as gw:
        await publish("plain", VariantArm("baseline", 0.5), VariantArm("var_a", 0.5, PROMPT_A))
        await picked_up(gw, "plain", {"baseline", "var_a"})
        arms: dict[str, str] = {}
        for i in range(30):
            user = f"user-{i}"
            seen = {
                (await post(gw, ask(uuid.uuid4().hex, user=user))).headers["x-flywheel-variant"]
                for _ in range(3)
            }
            assert len(seen) == 1, f"{user} switched arms: {seen}"
            arms[user] = seen.pop()
        # Without `user`, requests draw: both arms show up (1 in 2**20 that they do not).
        drawn = {
            (await post(gw, ask(uuid.uuid4().hex))).headers["x-flywheel-variant"] for _ in range(20)
        }
        baseline_marker = uuid.uuid4().hex
        user = next(u for u, a in arms.items() if a == "baseline")
        resp = await post(gw, ask(baseline_marker, user=user))
    assert set(arms.values()) == {"baseline", "var_a"}
    assert 5 <= sum(a == "var_a" for a in arms.values()) <= 25
    assert drawn == {"baseline", "var_a"}
    assert resp.headers["x-flywheel-variant"] == "baseline"
    (passed,) = received(openai_upstream, baseline_marker)  # the baseline passes through
    assert passed.body["messages"] == ask(baseline_marker)["messages"]


async def test_one_variants_cached_answer_is_not_served_to_another(
    settings: Settings,
    routes: RoutesFile,
    publish: Callable[..., Awaitable[None]],
    openai_upstream: FakeServer,
) -> None:
    m = uuid.uuid4().hex
    async with Served(create_app(settings, routes)) as gw:
        plain = [await post(gw, ask(m, model="cached")) for _ in range(2)]
        await publish("cached", VariantArm("var_a", 1, PROMPT_A))
        await picked_up(gw, "cached", {"var_a"})
        a = [await post(gw, ask(m, model="cached", stream=s)) for s in (False, True)]
        await publish("cached", VariantArm("var_b", 1, PROMPT_B))
        await picked_up(gw, "cached", {"var_b"})
        b = [await post(gw, ask(m, model="cached")) for _ in range(2)]
        # The same name with another prompt is another arm to the cache.
        await publish("cached", VariantArm("var_b", 1, PROMPT_B + " Really."))
        await picked_up(gw, "cached", {"var_b"}, PROMPT_B + " Really.")
        b2 = await post(gw, ask(m, model="cached"))
        await publish("cached")
        await picked_up(gw, "cached", None)
        back = await post(gw, ask(m, model="cached"))
    tiers = [r.headers["x-flywheel-cache"] for r in (*plain, *a, *b, b2, back)]
    assert tiers == ["miss", "hit-l1", "miss", "hit-l1", "miss", "hit-l1", "miss", "hit-l1"]
    assert [r.headers.get("x-flywheel-variant") for r in (*a, *b, b2, back)] == [
        "var_a",
        "var_a",
        "var_b",
        "var_b",
        "var_b",
        None,
    ]
    prompts = [s.body["messages"][0]["content"] for s in received(openai_upstream, m)]
    assert prompts == ["the client's own prompt", PROMPT_A, PROMPT_B, PROMPT_B + " Really."]


async def test_every_replica_applies_the_same_plan(
    settings: Settings,
    routes: RoutesFile,
    publish: Callable[..., Awaitable[None]],
    openai_upstream: FakeServer,
) -> None:
    m = uuid.uuid4().hex
    async with (
        Served(create_app(settings, routes)) as one,
        Served(create_app(settings, routes)) as two,
    ):
        await publish("cached", VariantArm("baseline", 0.5), VariantArm("var_a", 0.5, PROMPT_A))
        await asyncio.gather(*(picked_up(gw, "cached", {"baseline", "var_a"}) for gw in (one, two)))
        answers = [
            await post(gw, ask(uuid.uuid4().hex, model="cached", user=f"u{i}"))
            for i in range(8)
            for gw in (one, two)
        ]
        # A user gets the same arm from either replica, and its answer through the
        # shared L2: the replicas key the same variant the same way.
        first = await post(one, ask(m, model="cached", user="u-shared"))
        await asyncio.sleep(0.2)  # the L2 write is off the response's path
        second = await post(two, ask(m, model="cached", user="u-shared"))
    pairs = [(answers[i].headers, answers[i + 1].headers) for i in range(0, 16, 2)]
    assert all(x["x-flywheel-variant"] == y["x-flywheel-variant"] for x, y in pairs)
    assert first.headers["x-flywheel-cache"] == "miss"
    assert second.headers["x-flywheel-cache"] == "hit-l2"
    assert second.headers["x-flywheel-variant"] == first.headers["x-flywheel-variant"]
    assert len(received(openai_upstream, m)) == 1


async def test_an_ensemble_routes_variant_reaches_its_members(
    settings: Settings,
    routes: RoutesFile,
    publish: Callable[..., Awaitable[None]],
    openai_upstream: FakeServer,
) -> None:
    m = uuid.uuid4().hex
    async with Served(create_app(settings, routes)) as gw:
        await publish("ens", VariantArm("var_a", 1, PROMPT_A, {"seed": 11}))
        await picked_up(gw, "ens", {"var_a"})
        resp = await post(gw, ask(m, model="ens"))
        await asyncio.sleep(0.1)  # first_success: the other member may still be answering
    assert resp.status_code == 200
    assert resp.headers["x-flywheel-variant"] == "var_a"
    seen = received(openai_upstream, m)
    assert seen
    for s in seen:
        assert s.body["messages"][0] == {"role": "system", "content": PROMPT_A}
        assert s.body["seed"] == 11
