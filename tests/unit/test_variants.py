"""Prompt-variant plans: format, choice, application (no network; Redis is a stub here)."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections import Counter
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.api.variants import sent_request
from app.cycle.variants import (
    PlanBook,
    VariantArm,
    VariantPlan,
    apply,
    choose,
    parse_plan,
    plan_json,
    publish_plan,
    read_plans,
    variants_key,
)
from app.schemas.chat import CHAT_REQUEST

PROMPT = "You are terse."


def arm(name: str, share: float, prompt: str | None = None, **params: Any) -> dict[str, Any]:
    return {"variant": name, "share": share, "system_prompt": prompt, "params": params}


def raw_plan(*arms: dict[str, Any], experiment: str | None = "exp_1", version: int = 1) -> bytes:
    return orjson.dumps({"version": version, "experiment": experiment, "arms": list(arms)})


def split(baseline: float, variant: float, experiment: str = "exp_1") -> VariantPlan:
    return parse_plan(
        raw_plan(arm("baseline", baseline), arm("var_a", variant, PROMPT), experiment=experiment)
    )


BODY: dict[str, Any] = {
    "model": "r",
    "messages": [
        {"role": "system", "content": "Be helpful.", "name": "sys"},
        {"role": "user", "content": "hello"},
    ],
    "temperature": 0.7,
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "user": "u-1",
}


# --- format ---


def test_parse_normalises_shares_and_round_trips() -> None:
    plan = parse_plan(raw_plan(arm("baseline", 3), arm("var_a", 1, PROMPT, temperature=0)))
    assert [a.share for a in plan.arms] == [0.75, 0.25]
    assert plan.bounds == (0.75, 1.0)
    assert plan.version == 1
    assert plan.experiment == "exp_1"
    assert plan.arms[1].params == {"temperature": 0.0}
    again = parse_plan(plan_json(plan))
    assert again == plan
    assert parse_plan(plan_json(plan).encode()) == plan  # bytes (from Redis) or str


def test_params_are_whitelisted_and_spelled_one_way() -> None:
    plan = parse_plan(
        raw_plan(
            arm(
                "var_a",
                1,
                None,
                temperature=1,
                top_p=0.5,
                seed=3,
                max_completion_tokens=64,
                presence_penalty=-1,
                frequency_penalty=0.5,
                tools=[],
                model="other",
                n=4,
            )
        )
    )
    params = dict(plan.arms[0].params)
    assert params == {
        "temperature": 1.0,
        "top_p": 0.5,
        "seed": 3,
        "max_tokens": 64,
        "presence_penalty": -1.0,
        "frequency_penalty": 0.5,
    }
    assert isinstance(params["temperature"], float)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"version": 1}',
        raw_plan(),
        raw_plan(arm("a", 1), arm("a", 1)),  # a variant named twice
        raw_plan(arm("a", -0.1), arm("b", 1)),
        raw_plan(arm("a", 0), arm("b", 0)),  # no traffic anywhere
        raw_plan(arm("a", float("inf"))),
        raw_plan({"variant": "a", "share": "0.5"}),
        raw_plan({"variant": "a", "share": True}),
        raw_plan(arm("bad name\r\nx-evil: 1", 1)),  # it becomes a response header
        raw_plan(arm("", 1)),
        raw_plan(arm("a" * 129, 1)),
        raw_plan({"share": 1}),
        raw_plan(arm("a", 1, 42)),  # type: ignore[arg-type]
        raw_plan(arm("a", 1, None, temperature=2.5)),
        raw_plan(arm("a", 1, None, temperature="hot")),
        raw_plan(arm("a", 1, None, top_p=True)),
        raw_plan(arm("a", 1, None, max_tokens=0)),
        raw_plan(arm("a", 1, None, max_tokens=1.5)),
        raw_plan(arm("a", 1, None, seed=0.5)),
        raw_plan({"variant": "a", "share": 1, "params": [1]}),
        raw_plan("arm"),  # type: ignore[arg-type]
        raw_plan(arm("a", 1), version="7"),  # type: ignore[arg-type]
        raw_plan(arm("a", 1), experiment=5),  # type: ignore[arg-type]
    ],
)
def test_malformed_plans_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case fails for its own reason
        parse_plan(raw)


def test_the_worker_builds_plans_with_the_same_checks() -> None:
    plan = VariantPlan(
        version=2,
        experiment=None,
        arms=(VariantArm("baseline", 1), VariantArm("var_b", 1, PROMPT, {"seed": 1, "x": 2})),
    )
    assert [a.share for a in plan.arms] == [0.5, 0.5]
    assert dict(plan.arms[1].params) == {"seed": 1}
    assert plan.arm("var_b") is plan.arms[1]
    assert plan.arm("nope") is None
    with pytest.raises(ValueError, match="temperature"):
        VariantArm("var_c", 1, None, {"temperature": -1})


def test_fingerprints_tell_arms_apart_by_what_they_send() -> None:
    a = VariantArm("var_a", 1, PROMPT)
    assert a.fingerprint == VariantArm("var_a", 0.2, PROMPT).fingerprint  # share is not sent
    assert a.fingerprint != VariantArm("var_a", 1, PROMPT + "!").fingerprint
    assert a.fingerprint != VariantArm("var_a", 1, PROMPT, {"seed": 1}).fingerprint
    assert a.fingerprint != VariantArm("var_b", 1, PROMPT).fingerprint
    assert a.fingerprint.startswith("var_a:")


# --- choice ---


def test_one_arm_is_everyones() -> None:
    plan = parse_plan(raw_plan(arm("var_a", 1, PROMPT), experiment=None))
    rng = random.Random(0)
    assert {choose(plan, s, rng).variant for s in (None, "r\x00u1", "r\x00u2")} == {"var_a"}


def test_sticky_choice_is_stable_per_user_and_spread_by_share() -> None:
    plan = split(0.8, 0.2)
    for user in ("alice", "bob", "carol"):
        got = {choose(plan, f"r\x00{user}", random.Random(seed)).variant for seed in range(20)}
        assert len(got) == 1  # the same arm whatever the draw
    counts = Counter(choose(plan, f"r\x00user-{i}", random.Random(0)).variant for i in range(20000))
    assert counts["var_a"] / 20000 == pytest.approx(0.2, abs=0.015)


def test_without_user_each_request_draws() -> None:
    plan = split(0.7, 0.3)
    rng = random.Random(42)
    counts = Counter(choose(plan, None, rng).variant for _ in range(20000))
    assert counts["var_a"] / 20000 == pytest.approx(0.3, abs=0.015)


def test_a_zero_share_arm_is_never_chosen() -> None:
    plan = parse_plan(raw_plan(arm("baseline", 1), arm("var_z", 0, PROMPT), arm("var_b", 1, "b")))
    rng = random.Random(1)
    got = {choose(plan, None, rng).variant for _ in range(5000)}
    got |= {choose(plan, f"r\x00{i}", rng).variant for i in range(5000)}
    assert got == {"baseline", "var_b"}


def test_a_new_split_moves_only_users_across_the_moved_boundary() -> None:
    before, after = split(0.9, 0.1), split(0.8, 0.2)
    users = [f"r\x00u{i}" for i in range(5000)]
    rng = random.Random(0)
    was = {u: choose(before, u, rng).variant for u in users}
    now = {u: choose(after, u, rng).variant for u in users}
    # The variant's slice grew: its users keep it; some baseline users join it.
    assert all(now[u] == "var_a" for u in users if was[u] == "var_a")
    moved = sum(1 for u in users if was[u] != now[u])
    assert 0.07 * len(users) < moved < 0.13 * len(users)
    # Another experiment shuffles users afresh.
    other = split(0.5, 0.5, experiment="exp_2")
    same = split(0.5, 0.5)
    changed = sum(choose(other, u, rng).variant != choose(same, u, rng).variant for u in users)
    assert changed > 0.3 * len(users)


# --- application ---


def test_the_prompt_replaces_the_first_system_message_and_params_override() -> None:
    untouched = copy.deepcopy(BODY)
    variant = VariantArm("var_a", 1, PROMPT, {"temperature": 0.2, "seed": 9})
    sent = apply(variant, BODY)
    assert untouched == BODY  # never modified
    assert sent is not BODY
    assert sent["messages"] is not BODY["messages"]
    assert sent["messages"][0] == {"role": "system", "content": PROMPT, "name": "sys"}
    assert sent["messages"][1] is BODY["messages"][1]  # the rest shared, not copied
    assert sent["temperature"] == 0.2
    assert sent["seed"] == 9
    assert sent["tools"] is BODY["tools"]
    assert sent["user"] == "u-1"


def test_the_prompt_replaces_a_developer_message_only_the_first() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "developer", "content": "d1"},
            {"role": "system", "content": "s2"},
        ]
    }
    sent = apply(VariantArm("var_a", 1, PROMPT), body)
    assert [m["content"] for m in sent["messages"]] == ["a", PROMPT, "s2"]
    assert sent["messages"][1]["role"] == "developer"


def test_the_prompt_comes_first_when_the_request_has_none() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    sent = apply(VariantArm("var_a", 1, PROMPT), body)
    assert sent["messages"] == [
        {"role": "system", "content": PROMPT},
        {"role": "user", "content": "hi"},
    ]
    assert body == {"messages": [{"role": "user", "content": "hi"}]}


def test_params_only_arm_keeps_the_clients_prompt() -> None:
    sent = apply(VariantArm("var_p", 1, None, {"top_p": 0.1}), BODY)
    assert sent["messages"] is BODY["messages"]
    assert sent["top_p"] == 0.1


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ({}, {"max_tokens": 50}),
        ({"max_tokens": 10}, {"max_tokens": 50}),
        ({"max_completion_tokens": 10}, {"max_completion_tokens": 50}),
        (
            {"max_tokens": 10, "max_completion_tokens": 10},
            {"max_tokens": 50, "max_completion_tokens": 50},
        ),
    ],
)
def test_max_tokens_keeps_the_clients_spelling(
    client: dict[str, int], expected: dict[str, int]
) -> None:
    sent = apply(VariantArm("var_m", 1, None, {"max_tokens": 50}), {"messages": [], **client})
    assert {k: v for k, v in sent.items() if k != "messages"} == expected


def test_a_pass_through_arm_sends_the_body_as_it_is() -> None:
    assert apply(VariantArm("baseline", 1), BODY) is BODY


def test_a_body_that_is_not_a_request_is_left_for_validation() -> None:
    body = {"messages": "nope"}
    assert apply(VariantArm("var_a", 1, PROMPT), body)["messages"] == "nope"


@pytest.mark.parametrize(
    "variant",
    [
        VariantArm("var_a", 1, PROMPT, {"temperature": 0.2, "max_tokens": 7}),
        VariantArm("var_b", 1, None, {"seed": 4, "frequency_penalty": 1}),
        VariantArm("var_c", 1, PROMPT),
    ],
)
@pytest.mark.parametrize(
    "body",
    [
        BODY,
        {"model": "r", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3},
        {
            "model": "r",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}]},
                {"role": "developer", "content": "d"},
            ],
        },
    ],
)
def test_the_validated_request_matches_the_sent_body(
    variant: VariantArm, body: dict[str, Any]
) -> None:
    sent = apply(variant, body)
    client = CHAT_REQUEST.validate_python(body)
    before = client.model_dump()
    fast = sent_request(variant, sent, client)
    assert fast.model_dump() == CHAT_REQUEST.validate_python(sent).model_dump()
    assert client.model_dump() == before  # the client's request is not modified


# --- Redis helpers (a stub client) ---


class StubRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False
        self.round_trips = 0

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.round_trips += 1
        if self.down:
            raise RedisConnectionError("down")
        return [self.data.get(k) for k in keys]

    async def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)


async def test_publish_and_read_in_one_round_trip() -> None:
    redis: Any = StubRedis()
    await publish_plan(redis, "p:", "a", split(0.5, 0.5))
    await publish_plan(redis, "p:", "b", split(0.9, 0.1))
    assert set(redis.data) == {variants_key("p:", "a"), "p:variants:b"}
    plans = await read_plans(redis, "p:", ["a", "b", "c"])
    assert redis.round_trips == 1
    assert plans == {"a": split(0.5, 0.5), "b": split(0.9, 0.1)}
    await publish_plan(redis, "p:", "a", None)
    assert set(await read_plans(redis, "p:", ["a", "b", "c"])) == {"b"}
    assert await read_plans(redis, "p:", []) == {}


async def test_a_malformed_plan_keeps_the_last_good_one_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis: Any = StubRedis()
    book = PlanBook()
    await publish_plan(redis, "p:", "a", split(0.5, 0.5))
    await book.refresh(redis, "p:", ["a", "b"])
    good = book.plans["a"]
    redis.data["p:variants:a"] = b'{"arms": []}'
    redis.data["p:variants:b"] = b"garbage"
    with caplog.at_level(logging.WARNING, "flywheel.variants"):
        for _ in range(3):
            await book.refresh(redis, "p:", ["a", "b"])
    assert book.plans == {"a": good}  # kept; `b` never had a good one
    assert len(caplog.records) == 2  # one per malformed value, not per refresh
    caplog.clear()
    await publish_plan(redis, "p:", "a", split(0.2, 0.8))
    await book.refresh(redis, "p:", ["a", "b"])
    assert book.plans["a"] == split(0.2, 0.8)
    redis.data["p:variants:a"] = b"broken again"
    with caplog.at_level(logging.WARNING, "flywheel.variants"):
        await book.refresh(redis, "p:", ["a", "b"])
    assert len(caplog.records) == 1  # a new breakage is told again
    assert book.plans["a"] == split(0.2, 0.8)


async def test_redis_down_keeps_the_last_plans(caplog: pytest.LogCaptureFixture) -> None:
    redis: Any = StubRedis()
    await publish_plan(redis, "p:", "a", split(0.5, 0.5))
    book = PlanBook()
    task = asyncio.create_task(book.refresh_forever(redis, "p:", ["a"], 0.01))
    try:
        while "a" not in book.plans:
            await asyncio.sleep(0.01)
        redis.down = True
        with caplog.at_level(logging.WARNING, "flywheel.variants"):
            await asyncio.sleep(0.1)
        assert book.plans["a"] == split(0.5, 0.5)
        assert len(caplog.records) == 1  # one warning per outage
        redis.down = False
        await publish_plan(redis, "p:", "a", None)
        while book.plans:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
