"""Chat completions through `create_app`, served on loopback, against the fake OpenAI."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Served
from tests.fakes.server import FakeServer

ALL_ROLES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": "Answer in English."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": "cat"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    {"role": "user", "content": "And now?"},
]


def chat_body(model: str = "gpt-fake", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def post(gw: Served, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await gw.client.post(
        "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
    )


def assert_openai_error(resp: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert resp.headers["x-request-id"]
    return dict(body["error"])


async def test_completion_ids_headers_and_pass_through(
    gateway: Served, openai_upstream: FakeServer
) -> None:
    body = chat_body(
        messages=ALL_ROLES,
        temperature=0.2,
        top_p=0.9,
        max_tokens=50,
        seed=3,
        stop=["END"],
        n=1,
        user="u-1",
        metadata={"team": "a"},
        some_future_param={"x": 1},
    )
    resp = await post(gateway, body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["id"] == resp.headers["x-request-id"]
    assert data["choices"][0]["message"]["content"] == "Echo: And now?"
    assert data["usage"]["total_tokens"] > 0
    assert resp.headers["x-flywheel-route"] == "gpt-fake"
    assert resp.headers["x-flywheel-deployment"] == "fake-gpt-fake"
    assert resp.headers["x-flywheel-attempts"] == "1"
    assert resp.headers["x-flywheel-cache"] == "bypass"
    assert float(resp.headers["x-flywheel-overhead-ms"]) >= 0
    sent = openai_upstream.seen[-1]
    assert sent.body["model"] == "gpt-fake"
    assert sent.body["some_future_param"] == {"x": 1}
    assert sent.body["messages"] == ALL_ROLES
    assert sent.headers["Authorization"] == "Bearer sk-test-secret-0123456789"


async def test_tools_and_json_schema(gateway: Served) -> None:
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("a", "b")
    ]
    resp = await post(gateway, chat_body(tools=tools, tool_choice="auto"))
    message = resp.json()["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["a", "b"]
    assert resp.json()["choices"][0]["finish_reason"] == "tool_calls"
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    resp = await post(gateway, chat_body(response_format=fmt))
    assert orjson.loads(resp.json()["choices"][0]["message"]["content"]) == {"name": "x"}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "gpt-fake", "messages": [', None),
        (b"[1, 2]", None),
        (b"", None),
        (orjson.dumps({"model": "gpt-fake"}), "messages"),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (orjson.dumps(chat_body(temperature=5)), "temperature"),
        (orjson.dumps(chat_body(messages=[{"role": "robot", "content": "x"}])), "messages.0"),
        (
            orjson.dumps(chat_body(messages=[{"role": "tool", "content": "x"}])),
            "messages.0.tool.tool_call_id",
        ),
        (orjson.dumps(chat_body(tool_choice="required")), None),
    ],
)
async def test_bad_input_is_400_with_param(gateway: Served, raw: bytes, param: str | None) -> None:
    err = assert_openai_error(await post(gateway, raw), 400, "invalid_request_error")
    if param:
        assert err["param"] == param
    assert "detail" not in err


async def test_unknown_model_is_404(gateway: Served) -> None:
    err = assert_openai_error(await post(gateway, chat_body("nope")), 404, "invalid_request_error")
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"


async def test_body_over_limit_is_413(gateway: Served) -> None:
    huge = chat_body(messages=[{"role": "user", "content": "x" * (4 * 1024 * 1024 + 10)}])
    err = assert_openai_error(await post(gateway, huge), 413, "invalid_request_error")
    assert err["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("route", "status", "type_"),
    [
        ("fails-429", 429, "rate_limit_error"),
        ("fails-400", 400, "invalid_request_error"),
        ("fails-500", 502, "upstream_error"),
        ("slow", 504, "upstream_error"),
    ],
)
async def test_upstream_errors(gateway: Served, route: str, status: int, type_: str) -> None:
    for stream in (False, True):
        resp = await post(gateway, chat_body(route, stream=stream))
        err = assert_openai_error(resp, status, type_)
        assert resp.headers["x-flywheel-route"] == route
        if status == 429:
            assert resp.headers["retry-after"] == "2"
        assert "Traceback" not in err["message"]


async def test_upstream_auth_error_never_leaks_keys(gateway: Served) -> None:
    # The fake's 401 message quotes a key (as OpenAI's does); the gateway cuts it out.
    resp = await post(gateway, chat_body("nokey"))
    err = assert_openai_error(resp, 401, "authentication_error")
    assert "sk-fake-leak" not in resp.text
    assert "***" in err["message"]


async def test_unknown_path_and_method_are_openai_shaped(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        assert_openai_error(await client.get("/v1/nothing"), 404, "invalid_request_error")
        assert_openai_error(await client.get("/v1/chat/completions"), 405, "invalid_request_error")
