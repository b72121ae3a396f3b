"""The running gateway driven by the official `openai` SDK, sync and async, and raw HTTP."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.conftest import System

pytestmark = pytest.mark.e2e

TOOLS: list[dict[str, object]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]


def client(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.url + "/v1", api_key="unused", max_retries=0)


def aclient(system: System) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=system.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["gpt-fake", "claude", "gemini", "demo"])
def test_sync_completion_every_provider(system: System, model: str) -> None:
    raw = client(system).chat.completions.with_raw_response.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        max_tokens=64,
    )
    completion = raw.parse()
    assert completion.id == raw.headers["x-request-id"]
    assert raw.headers["x-flywheel-route"] == model
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0


@pytest.mark.parametrize("model", ["gpt-fake", "claude", "gemini", "demo"])
async def test_async_streaming_every_provider(system: System, model: str) -> None:
    stream = await aclient(system).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Stream a greeting please"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=64,
    )
    text, ids, usage = "", set(), None
    async for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text.strip()
    assert len(ids) == 1
    assert next(iter(ids)).startswith("chatcmpl-")
    assert usage is not None
    assert usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["gpt-fake", "claude", "gemini"])
async def test_tools_streamed_and_not(system: System, model: str) -> None:
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    c = aclient(system)
    done = await c.chat.completions.create(model=model, messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    calls = done.choices[0].message.tool_calls
    assert calls
    assert done.choices[0].finish_reason == "tool_calls"
    stream = await c.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        stream=True,  # type: ignore[arg-type]
    )
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    async for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args[tc.index] = args.get(tc.index, "") + (
                tc.function.arguments or "" if tc.function else ""
            )
            if tc.function and tc.function.name:
                names[tc.index] = tc.function.name
    assert sorted(names) == list(range(len(calls)))
    for index in names:
        json.loads(args[index])
    # And the round trip: tool results go back to the same route.
    follow = await c.chat.completions.create(
        model=model,
        tools=TOOLS,
        messages=[  # type: ignore[arg-type]
            *messages,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tc.model_dump(exclude_none=True) for tc in calls],
            },
            *({"role": "tool", "tool_call_id": tc.id, "content": '{"ok": true}'} for tc in calls),
        ],
    )
    assert follow.choices[0].message.content


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.parametrize("model", ["gpt-fake", "demo"])
def test_json_schema_structured_output(system: System, model: str) -> None:
    schema = Person.model_json_schema()
    done = client(system).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Invent a person"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        seed=1,
    )
    content = done.choices[0].message.content or ""
    assert set(json.loads(content)) >= {"name"}


def test_sdk_errors(system: System) -> None:
    c = client(system)
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.RateLimitError) as limited:
        c.chat.completions.create(model="fails-429", messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "2"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]


def test_embeddings_and_models(system: System) -> None:
    c = client(system)
    out = c.embeddings.create(model="gpt-fake", input=["a", "b"])
    assert len(out.data) == 2
    assert {m.id for m in c.models.list()} >= {"gpt-fake", "claude", "gemini", "demo"}
    assert c.models.retrieve("claude").id == "claude"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "gpt-fake"}).encode(), 400, "invalid_value"),
        (
            json.dumps(
                {
                    "model": "gpt-fake",
                    "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}],
                }
            ).encode(),
            413,
            "request_too_large",
        ),
    ],
)
def test_raw_bad_inputs(system: System, content: bytes, status: int, code: str) -> None:
    resp = httpx.post(
        system.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code
    assert "detail" not in resp.json()
    assert resp.headers["x-request-id"]


def test_health_detailed_reports_worker_heartbeat(system: System) -> None:
    deadline = time.monotonic() + 20
    detail: dict[str, object] = {}
    while time.monotonic() < deadline:
        detail = httpx.get(system.url + "/health/detailed", timeout=5).json()
        if detail["status"] == "ok":
            break
        time.sleep(0.5)
    assert detail["status"] == "ok", detail
    workers = detail["workers"]
    assert isinstance(workers, dict)
    assert workers["instances"][0]["alive"] is True
