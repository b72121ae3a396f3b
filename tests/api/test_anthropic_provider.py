"""The Anthropic adapter against a fake Anthropic server speaking the real wire format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from app.errors import (
    InvalidRequestError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.providers.anthropic import AnthropicProvider
from app.providers.base import JSON, ChatCall, EmbedCall
from app.providers.http import make_session
from app.routing.config import DeploymentConfig
from app.schemas.chat import ChatCompletionRequest
from app.schemas.embeddings import EmbeddingRequest
from tests.fakes.anthropic_fake import TOOL_PREAMBLE, anthropic_fake
from tests.fakes.server import FakeServer

KEY = "anthropic-test-key-0123456789"
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    },
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with anthropic_fake() as server:
        yield server


@pytest.fixture(scope="module")
async def provider() -> AsyncIterator[AnthropicProvider]:
    session = make_session(max_connections=10, connect_timeout_s=2)
    yield AnthropicProvider(session)
    await session.close()


def chat_call(
    fake: FakeServer, model: str, body: dict[str, Any], *, key: str = KEY, timeout_s: float = 5
) -> ChatCall:
    full = {"model": "client-route", **body}
    return ChatCall(
        request=ChatCompletionRequest.model_validate(full),
        body=full,
        deployment=DeploymentConfig(
            name="claude", provider="anthropic", model=model, api_base=fake.url
        ),
        api_key=SecretStr(key),
        timeout_s=timeout_s,
        request_id="req-test",
    )


def ask(content: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


async def collect(provider: AnthropicProvider, call: ChatCall) -> list[JSON]:
    return [c async for c in provider.stream(call)]


async def drain(stream: AsyncIterator[JSON], into: list[JSON]) -> None:
    """Read a stream to its end, keeping what came before a failure in `into`."""
    async for c in stream:
        into.append(c)


def deltas(chunks: list[JSON]) -> list[JSON]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


# -------------------------------------------------------------------------- JSON


async def test_complete_text(fake: FakeServer, provider: AnthropicProvider) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"},
        ],
        "temperature": 1.5,
        "user": "u-1",
    }
    out = await provider.complete(chat_call(fake, "claude-test", body))

    assert out["object"] == "chat.completion"
    assert out["model"] == "claude-test"
    assert out["choices"][0]["message"]["content"] == "Echo: hello there"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["prompt_tokens"] > 0
    assert out["usage"]["total_tokens"] == (
        out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    )
    seen = fake.seen[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["Content-Type"] == "application/json"
    assert "authorization" not in {h.lower() for h in seen.headers}
    assert seen.body == {
        "model": "claude-test",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "max_tokens": 4096,
        "temperature": 1.0,
        "metadata": {"user_id": "u-1"},
    }


async def test_complete_tool_round_trip(fake: FakeServer, provider: AnthropicProvider) -> None:
    first = await provider.complete(chat_call(fake, "claude-test", ask("weather?", tools=TOOLS)))
    message = first["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] == TOOL_PREAMBLE
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"q": 0}, {"q": 1}]
    assert fake.seen[-1].body["tools"][1] == {
        "name": "get_time",
        "input_schema": {"type": "object", "properties": {}},
    }

    # Send the answers back: the fake refuses tool results that match no tool_use.
    follow_up = {
        "messages": [
            {"role": "user", "content": "weather?"},
            message,
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
            {"role": "tool", "tool_call_id": calls[1]["id"], "content": "noon"},
        ],
        "tools": TOOLS,
    }
    second = await provider.complete(chat_call(fake, "claude-test", follow_up))
    assert second["choices"][0]["message"]["content"] == "Echo: sunny noon"
    assert second["choices"][0]["finish_reason"] == "stop"
    sent = fake.seen[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert [b["type"] for b in sent[1]["content"]] == ["text", "tool_use", "tool_use"]
    assert sent[2]["content"] == [
        {"type": "tool_result", "tool_use_id": calls[0]["id"], "content": "sunny"},
        {"type": "tool_result", "tool_use_id": calls[1]["id"], "content": "noon"},
    ]


async def test_single_tool_when_parallel_calls_are_off(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    body = ask("weather?", tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    out = await provider.complete(chat_call(fake, "claude-test", body))
    assert len(out["choices"][0]["message"]["tool_calls"]) == 1
    assert fake.seen[-1].body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(
    ("extra", "finish", "content"),
    [
        ({"stop": ["there"]}, "stop", "Echo: hello "),
        ({"max_tokens": 2}, "length", "Echo: hello"),
    ],
)
async def test_complete_stop_sequence_and_length(
    fake: FakeServer, provider: AnthropicProvider, extra: Any, finish: str, content: str
) -> None:
    out = await provider.complete(chat_call(fake, "claude-test", ask("hello there", **extra)))
    assert out["choices"][0]["finish_reason"] == finish
    assert out["choices"][0]["message"]["content"] == content


async def test_complete_json_mode_via_system_instruction(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    body = ask("hi", response_format={"type": "json_object"})
    out = await provider.complete(chat_call(fake, "claude-test", body))
    assert orjson.loads(out["choices"][0]["message"]["content"]) == {"answer": "hi"}
    assert "JSON" in fake.seen[-1].body["system"]


async def test_cached_tokens_count_as_prompt(fake: FakeServer, provider: AnthropicProvider) -> None:
    plain = await provider.complete(chat_call(fake, "claude-test", ask("same")))
    cached = await provider.complete(chat_call(fake, "cached-claude", ask("same")))
    # The fake reports 10 cache reads and 5 cache writes on top of the same input.
    assert cached["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 15
    assert cached["usage"]["prompt_tokens_details"] == {"cached_tokens": 10}


async def test_image_parts_reach_upstream_as_image_blocks(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    out = await provider.complete(chat_call(fake, "claude-test", ask(content)))
    assert out["choices"][0]["message"]["content"] == "Echo: describe"
    sent = fake.seen[-1].body["messages"][0]["content"]
    assert sent[1]["source"] == {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}
    assert sent[2]["source"] == {"type": "url", "url": "https://example.com/a.png"}


async def test_untranslatable_request_never_reaches_upstream(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    before = len(fake.seen)
    body = {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{oops"},
                    }
                ],
            },
        ]
    }
    with pytest.raises(InvalidRequestError) as caught:
        await provider.complete(chat_call(fake, "claude-test", body))
    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"
    with pytest.raises(InvalidRequestError):
        await collect(provider, chat_call(fake, "claude-test", body))
    assert len(fake.seen) == before


async def test_embeddings_are_unsupported(fake: FakeServer, provider: AnthropicProvider) -> None:
    request = EmbeddingRequest.model_validate({"model": "e", "input": "x"})
    call = EmbedCall(
        request=request,
        body={"model": "e", "input": "x"},
        deployment=DeploymentConfig(name="c", provider="anthropic", model="claude"),
        api_key=SecretStr(KEY),
        timeout_s=5,
        request_id="r",
    )
    with pytest.raises(InvalidRequestError) as caught:
        await provider.embed(call)
    assert caught.value.code == "unsupported_model"


# --------------------------------------------------------------------- streaming


async def test_stream_text(fake: FakeServer, provider: AnthropicProvider) -> None:
    chunks = await collect(provider, chat_call(fake, "claude-test", ask("stream me please")))
    ds = deltas(chunks)
    assert ds[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in ds) == "Echo: stream me please"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 1  # from message_delta, not message_start's 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["model"] == "claude-test" for c in chunks)
    assert fake.seen[-1].body["stream"] is True


async def test_stream_two_tool_calls_keep_their_indexes(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    chunks = await collect(provider, chat_call(fake, "claude-test", ask("go", tools=TOOLS)))
    ds = deltas(chunks)
    assert "".join(d.get("content", "") for d in ds) == TOOL_PREAMBLE
    calls = [call for d in ds for call in d.get("tool_calls", [])]
    # The fake's tool_use blocks are at Anthropic indexes 1 and 2 (after the text block).
    assert [(c["index"], c["function"]["name"]) for c in calls if "id" in c] == [
        (0, "get_weather"),
        (1, "get_time"),
    ]
    arguments = {0: "", 1: ""}
    for call in calls:
        arguments[call["index"]] += call["function"]["arguments"]
    assert {i: orjson.loads(a) for i, a in arguments.items()} == {0: {"q": 0}, 1: {"q": 1}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_stream_cut_is_an_upstream_error(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    received: list[JSON] = []
    with pytest.raises(UpstreamError):
        await drain(provider.stream(chat_call(fake, "cut-2", ask("one two three four"))), received)
    assert "".join(d.get("content", "") for d in deltas(received)) == "Echo: one "


async def test_stream_mid_error_event(fake: FakeServer, provider: AnthropicProvider) -> None:
    received: list[JSON] = []
    stream = provider.stream(chat_call(fake, "overloaded-mid", ask("a b c d")))
    with pytest.raises(UpstreamError) as caught:
        await drain(stream, received)
    assert "Overloaded" in caught.value.message
    assert caught.value.status == 502
    assert len(deltas(received)) == 3  # the role chunk and two text deltas


async def test_stream_malformed_event(fake: FakeServer, provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(provider, chat_call(fake, "malformed", ask("a b c")))
    assert "malformed" in caught.value.message


async def test_stream_closed_early_releases_the_connection(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    before = len(fake.state.disconnects)
    stream = provider.stream(chat_call(fake, "drip-20", ask("tick")))
    assert isinstance(stream, AsyncIterator)
    for _ in range(3):
        await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 3
    while len(fake.state.disconnects) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(fake.state.disconnects) == before + 1


# ------------------------------------------------------------------------ errors


async def test_429_passes_through_with_retry_after(
    fake: FakeServer, provider: AnthropicProvider
) -> None:
    with pytest.raises(UpstreamStatusError) as caught:
        await provider.complete(chat_call(fake, "fail-429", ask("hi")))
    assert caught.value.status == 429
    assert caught.value.retry_after == 2
    assert caught.value.code == "rate_limit_error"
    assert caught.value.headers["Retry-After"] == "2"
    assert "fake failure 429" in caught.value.message


@pytest.mark.parametrize("status", [500, 529])
async def test_server_errors_become_502(
    fake: FakeServer, provider: AnthropicProvider, status: int
) -> None:
    with pytest.raises(UpstreamStatusError) as caught:
        await provider.complete(chat_call(fake, f"fail-{status}", ask("hi")))
    assert caught.value.status == 502
    assert caught.value.upstream_status == status
    with pytest.raises(UpstreamStatusError) as streamed:
        await collect(provider, chat_call(fake, f"fail-{status}", ask("hi")))
    assert streamed.value.status == 502


async def test_upstream_400_passes_through(fake: FakeServer, provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamStatusError) as caught:
        await provider.complete(chat_call(fake, "fail-400", ask("hi")))
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    assert caught.value.code == "invalid_request_error"


async def test_401_never_echoes_the_key(fake: FakeServer, provider: AnthropicProvider) -> None:
    key = "bad-key-that-must-stay-secret-42"
    for run in (provider.complete, lambda c: collect(provider, c)):
        with pytest.raises(UpstreamStatusError) as caught:
            await run(chat_call(fake, "claude-test", ask("hi"), key=key))
        assert caught.value.status == 401
        assert caught.value.type == "authentication_error"
        assert "invalid x-api-key" in caught.value.message  # the fake did echo the key…
        assert key not in caught.value.message  # …and the adapter scrubbed it
        assert key not in str(caught.value)
    assert fake.seen[-1].headers["x-api-key"] == key


@pytest.mark.parametrize("streaming", [False, True])
async def test_slow_upstream_times_out(
    fake: FakeServer, provider: AnthropicProvider, streaming: bool
) -> None:
    call = chat_call(fake, "slow-2000", ask("hi"), timeout_s=0.3)
    started = time.monotonic()
    run = collect(provider, call) if streaming else provider.complete(call)
    with pytest.raises(UpstreamTimeoutError) as caught:
        await run
    assert caught.value.status == 504
    assert time.monotonic() - started < 1.5


async def test_unreachable_upstream(provider: AnthropicProvider) -> None:
    # A port nothing listens on: bound then closed, so the connection is refused.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    call = ChatCall(
        request=ChatCompletionRequest.model_validate({"model": "r", **ask("hi")}),
        body={},
        api_key=SecretStr(KEY),
        timeout_s=2,
        request_id="r",
        deployment=DeploymentConfig(
            name="c", provider="anthropic", model="m", api_base=f"http://127.0.0.1:{port}"
        ),
    )
    with pytest.raises(UpstreamError) as caught:
        await provider.complete(call)
    assert caught.value.status == 502
    assert KEY not in caught.value.message
