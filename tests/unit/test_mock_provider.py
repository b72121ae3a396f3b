"""The mock provider: deterministic for a seed, honest about its quality level."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from app.errors import UpstreamStatusError
from app.providers.base import ChatCall
from app.providers.mock import REFUSAL, MockProvider
from app.routing.config import DeploymentConfig, MockParams
from app.schemas.chat import ChatCompletionRequest


def call(body: dict[str, Any], **mock: Any) -> ChatCall:
    params = {"latency_ms": 0, "jitter_ms": 0, **mock}
    return ChatCall(
        request=ChatCompletionRequest.model_validate(body),
        body=body,
        deployment=DeploymentConfig(
            name="m", provider="mock", model="mock-1", mock=MockParams(**params)
        ),
        api_key=None,
        timeout_s=5,
        request_id="chatcmpl-x",
    )


BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_same_seed_same_sequence() -> None:
    a, b = MockProvider(), MockProvider()
    first = [await a.complete(call(BODY, quality=0.5, seed=3)) for _ in range(20)]
    second = [await b.complete(call(BODY, quality=0.5, seed=3)) for _ in range(20)]
    assert [r["choices"] for r in first] == [r["choices"] for r in second]
    other = [await MockProvider().complete(call(BODY, quality=0.5, seed=4)) for _ in range(20)]
    assert [r["choices"] for r in other] != [r["choices"] for r in first]


async def test_request_seed_is_repeatable() -> None:
    p = MockProvider()
    body = {**BODY, "seed": 42}
    results = {
        orjson.dumps((await p.complete(call(body, quality=0.5)))["choices"]) for _ in range(5)
    }
    assert len(results) == 1


async def test_quality_level_sets_the_share_of_good_answers() -> None:
    p = MockProvider()
    kinds: Counter[str] = Counter()
    for _ in range(400):
        choice = (await p.complete(call(BODY, quality=0.7, seed=9)))["choices"][0]
        content = choice["message"]["content"]
        if content == "":
            kinds["empty"] += 1
        elif content == REFUSAL:
            kinds["refusal"] += 1
        elif choice["finish_reason"] == "length":
            kinds["truncated"] += 1
        elif content.startswith("[mock-1]"):
            kinds["good"] += 1
        else:
            kinds["invalid_json"] += 1
    assert 0.62 < kinds["good"] / 400 < 0.78
    assert {"empty", "refusal", "truncated"} <= set(kinds)


async def test_error_rate() -> None:
    p = MockProvider()
    errors = 0
    for _ in range(200):
        try:
            await p.complete(call(BODY, error_rate=0.3, seed=1))
        except UpstreamStatusError:
            errors += 1
    assert 40 < errors < 80


async def test_json_schema_answer_is_valid_json() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    body = {
        **BODY,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    result = await MockProvider().complete(call(body, quality=1.0))
    value = orjson.loads(result["choices"][0]["message"]["content"])
    assert isinstance(value["n"], int)
    assert isinstance(value["tags"], list)


async def test_tool_call_and_stream_shapes() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    body = {**BODY, "tools": [tool], "tool_choice": "required"}
    result = await MockProvider().complete(call(body, quality=1.0))
    tc = result["choices"][0]["message"]["tool_calls"][0]
    assert tc["function"]["name"] == "get"
    assert "city" in orjson.loads(tc["function"]["arguments"])
    chunks = [c async for c in MockProvider().stream(call(body, quality=1.0))]
    args = "".join(
        d["function"].get("arguments", "")
        for c in chunks
        if c["choices"]
        for d in c["choices"][0]["delta"].get("tool_calls", [])
    )
    assert orjson.loads(args) == orjson.loads(tc["function"]["arguments"])
    assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("limit", [1, 3])
async def test_output_limit_truncates(limit: int) -> None:
    result = await MockProvider().complete(call({**BODY, "max_tokens": limit}, quality=1.0))
    assert result["choices"][0]["finish_reason"] == "length"
