"""The Gemini adapter against a fake Gemini API speaking Google's wire format on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from app.errors import (
    InvalidRequestError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.providers.base import JSON, ChatCall, EmbedCall
from app.providers.gemini import GeminiProvider
from app.providers.http import make_session
from app.routing.config import DeploymentConfig
from app.schemas.chat import ChatCompletionRequest
from app.schemas.embeddings import EmbeddingRequest
from tests.fakes.gemini_fake import gemini_fake
from tests.fakes.server import FakeServer, Seen

# Deliberately unlike any known key format, so only the adapter's own scrubbing hides it.
KEY = "gm-test-secret-7f3a9c21"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with gemini_fake() as server:
        yield server


@pytest.fixture(scope="module")
async def provider() -> AsyncIterator[GeminiProvider]:
    session = make_session(max_connections=10, connect_timeout_s=2)
    yield GeminiProvider(session)
    await session.close()


def deployment(fake: FakeServer, model: str) -> DeploymentConfig:
    return DeploymentConfig(name=f"g-{model}", provider="gemini", model=model, api_base=fake.url)


def chat(
    fake: FakeServer,
    model: str,
    messages: list[JSON] | None = None,
    *,
    key: str | None = KEY,
    timeout_s: float = 5.0,
    **extra: Any,
) -> ChatCall:
    body = {"model": "route", "messages": messages or HELLO, **extra}
    return ChatCall(
        request=ChatCompletionRequest.model_validate(body),
        body=body,
        deployment=deployment(fake, model),
        api_key=SecretStr(key) if key else None,
        timeout_s=timeout_s,
        request_id="req-test",
    )


def embed(fake: FakeServer, model: str, **body: Any) -> EmbedCall:
    body = {"model": "emb-route", **body}
    return EmbedCall(
        request=EmbeddingRequest.model_validate(body),
        body=body,
        deployment=deployment(fake, model),
        api_key=SecretStr(KEY),
        timeout_s=5.0,
        request_id="req-test",
    )


def last_seen(fake: FakeServer) -> Seen:
    return fake.seen[-1]


def headers_of(seen: Seen) -> dict[str, str]:
    return {k.lower(): v for k, v in seen.headers.items()}


async def collect(
    provider: GeminiProvider, call: ChatCall, into: list[JSON] | None = None
) -> list[JSON]:
    """The stream's chunks; `into` keeps those that arrived if the stream fails."""
    got = [] if into is None else into
    async for c in provider.stream(call):
        got.append(c)
    return got


async def run(provider: GeminiProvider, call: ChatCall) -> object:
    return await collect(provider, call) if call.request.stream else await provider.complete(call)


def deltas(chunks: list[JSON]) -> list[JSON]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


# ---------------------------------------------------------------- completions


async def test_complete_sends_the_key_in_the_header_and_never_in_the_url(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    out = await provider.complete(chat(fake, "gemini-test"))
    seen = last_seen(fake)
    assert seen.path == "/v1beta/models/gemini-test:generateContent"
    assert seen.query == {}
    assert headers_of(seen)["x-goog-api-key"] == KEY
    assert KEY not in seen.path
    assert seen.body == {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
    assert out["object"] == "chat.completion"
    assert out["model"] == "gemini-test-fake-001"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Echo: hello there"}
    assert out["choices"][0]["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_system_prompt_and_sampling_parameters_reach_gemini(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    messages = [{"role": "system", "content": "Be terse."}, *HELLO]
    out = await provider.complete(
        chat(
            fake,
            "gemini-test",
            messages,
            temperature=0.2,
            top_p=0.5,
            seed=3,
            stop=["\n\n"],
            max_completion_tokens=100,
            n=2,
        )
    )
    body = last_seen(fake).body
    assert body["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.5,
        "seed": 3,
        "stopSequences": ["\n\n"],
        "maxOutputTokens": 100,
        "candidateCount": 2,
    }
    assert [c["index"] for c in out["choices"]] == [0, 1]


async def test_tool_round_trip_names_function_results(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"q": {"type": "integer"}},
    }
    tools = [
        {"type": "function", "function": {"name": n, "parameters": schema, "strict": True}}
        for n in ("get_weather", "get_time")
    ]
    first = await provider.complete(chat(fake, "gemini-test", tools=tools))
    message = first["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ] == [("get_weather", {"q": 0}), ("get_time", {"q": 1})]
    declared = last_seen(fake).body["tools"][0]["functionDeclarations"]
    assert declared[0]["parameters"] == {"type": "object", "properties": {"q": {"type": "integer"}}}

    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": f'{{"n": {i}}}'}
        for i, c in enumerate(reversed(message["tool_calls"]))
    ]
    second = await provider.complete(
        chat(fake, "gemini-test", [*HELLO, message, *results], tools=tools)
    )
    contents = last_seen(fake).body["contents"]
    assert contents[1]["role"] == "model"
    assert [p["functionCall"]["name"] for p in contents[1]["parts"]] == ["get_weather", "get_time"]
    assert contents[2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_time", "response": {"content": {"n": 0}}}},
            {"functionResponse": {"name": "get_weather", "response": {"content": {"n": 1}}}},
        ],
    }
    assert second["choices"][0]["finish_reason"] == "stop"
    assert second["choices"][0]["message"]["content"].startswith("Echo: get_time -> ")


async def test_named_tool_choice_limits_the_calls(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    out = await provider.complete(
        chat(
            fake,
            "gemini-test",
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "b"}},
        )
    )
    assert last_seen(fake).body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["b"]}
    }
    assert [c["function"]["name"] for c in out["choices"][0]["message"]["tool_calls"]] == ["b"]


async def test_json_schema_answers_are_json(fake: FakeServer, provider: GeminiProvider) -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    }
    out = await provider.complete(
        chat(
            fake,
            "gemini-test",
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "strict": True, "schema": schema},
            },
        )
    )
    config = last_seen(fake).body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert "additionalProperties" not in config["responseSchema"]
    assert json.loads(out["choices"][0]["message"]["content"]) == {"name": "x", "age": 1}


async def test_finish_reasons_length_and_content_filter(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    cut = await provider.complete(chat(fake, "gemini-test", max_tokens=2))
    assert cut["choices"][0] == {
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": "Echo: hello"},
    }
    for model in ("blocked", "safety"):
        out = await provider.complete(chat(fake, model))
        assert out["choices"][0]["finish_reason"] == "content_filter", model
        assert out["choices"][0]["message"]["content"] == "", model


async def test_thinking_tokens_count_as_completion_tokens(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    out = await provider.complete(chat(fake, "think-pro"))
    usage = out["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 7}
    assert usage["completion_tokens"] >= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_request_gemini_cannot_take_fails_before_any_connection(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    messages: list[JSON] = [
        *HELLO,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
            ],
        },
    ]
    before = len(fake.seen)
    with pytest.raises(InvalidRequestError) as info:
        await provider.complete(chat(fake, "gemini-test", messages))
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    with pytest.raises(InvalidRequestError):
        await collect(provider, chat(fake, "gemini-test", messages, stream=True))
    assert len(fake.seen) == before


# ---------------------------------------------------------------- streaming


async def test_stream_text_then_finish_then_usage(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    chunks = await collect(provider, chat(fake, "gemini-test", stream=True))
    seen = last_seen(fake)
    assert seen.path == "/v1beta/models/gemini-test:streamGenerateContent"
    assert seen.query == {"alt": "sse"}
    assert headers_of(seen)["x-goog-api-key"] == KEY
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    got = deltas(chunks)
    assert got[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in got) == "Echo: hello there"
    assert len([d for d in got if d.get("content")]) == 3  # one per word the fake sent
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert finishes.count("stop") == 1
    assert got[-1] == {}
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] > 0
    assert last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )


async def test_stream_two_function_calls_keep_their_indexes(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    tools = [{"type": "function", "function": {"name": n}} for n in ("first", "second")]
    chunks = await collect(provider, chat(fake, "gemini-test", stream=True, tools=tools))
    calls = [d["tool_calls"][0] for d in deltas(chunks) if "tool_calls" in d]
    assert [
        (c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ] == [(0, "first", {"q": 0}), (1, "second", {"q": 1})]
    assert all(c["id"].startswith(f"call_{c['index']}_") for c in calls)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert "usage" in chunks[-1]


async def test_stream_of_a_blocked_prompt_ends_with_content_filter(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    chunks = await collect(provider, chat(fake, "blocked", stream=True))
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [
        None,
        "content_filter",
    ]


async def test_a_cut_stream_is_an_upstream_error(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    got: list[JSON] = []
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(fake, "cut-1", stream=True), got)
    assert not isinstance(info.value, UpstreamTimeoutError)
    assert info.value.status == 502
    # The part that arrived was passed on before the failure.
    assert deltas(got) == [{"role": "assistant", "content": ""}, {"content": "Echo: "}]


async def test_a_stream_that_ends_without_a_finish_reason_is_interrupted(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    got: list[JSON] = []
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(fake, "unfinished", stream=True), got)
    assert info.value.code == "stream_interrupted"
    assert info.value.status == 502
    assert "".join(d.get("content", "") for d in deltas(got)) == "Echo: hello there"
    assert not any("usage" in c for c in got)


async def test_a_malformed_event_is_an_upstream_error(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(provider, chat(fake, "malformed", stream=True))


async def test_closing_the_stream_early_releases_the_upstream(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    closed = fake.state.closed_streams
    stream = provider.stream(chat(fake, "drip-20", stream=True))
    assert isinstance(stream, AsyncIterator)
    first = [await anext(stream) for _ in range(3)]
    assert deltas(first)[1:] == [{"content": "tick0 "}, {"content": "tick1 "}]
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(100):
        if fake.state.closed_streams > closed:
            break
        await asyncio.sleep(0.05)
    assert fake.state.closed_streams > closed


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("stream", [False, True])
async def test_429_passes_through_with_retry_after(
    fake: FakeServer, provider: GeminiProvider, stream: bool
) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await run(provider, chat(fake, "fail-429", stream=stream))
    err = info.value
    assert (err.status, err.upstream_status, err.retry_after) == (429, 429, 2.0)
    assert err.code == "rate_limit_exceeded"
    assert err.type == "rate_limit_error"
    assert err.headers["Retry-After"] == "2"


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_becomes_502_without_the_key(
    fake: FakeServer, provider: GeminiProvider, status: int
) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(chat(fake, f"fail-{status}"))
    err = info.value
    assert (err.status, err.upstream_status) == (502, status)
    assert f"fake failure {status}" in err.message  # the fake's message, with the key in it
    assert KEY not in err.message
    assert KEY not in json.dumps(err.body())


async def test_client_errors_pass_through_with_googles_status_as_code(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(chat(fake, "fail-400"))
    assert (info.value.status, info.value.code) == (400, "invalid_argument")
    assert KEY not in info.value.message

    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(chat(fake, "gemini-test", key=None))
    assert (info.value.status, info.value.code) == (403, "permission_denied")
    assert info.value.type == "permission_error"
    assert "x-goog-api-key" not in headers_of(last_seen(fake))

    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(chat(fake, "gemini-test", key="bad-key"))
    assert (info.value.status, info.value.code) == (400, "invalid_api_key")


async def test_slow_upstream_with_short_timeout_is_504(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    with pytest.raises(UpstreamTimeoutError) as info:
        await provider.complete(chat(fake, "slow-1000", timeout_s=0.3))
    assert info.value.status == 504
    with pytest.raises(UpstreamTimeoutError):
        await collect(provider, chat(fake, "slow-1000", timeout_s=0.3, stream=True))


async def test_unreachable_upstream_is_502(provider: GeminiProvider) -> None:
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    call = ChatCall(
        request=ChatCompletionRequest.model_validate({"model": "r", "messages": HELLO}),
        body={},
        deployment=DeploymentConfig(name="d", provider="gemini", model="m", api_base=base),
        api_key=SecretStr(KEY),
        timeout_s=2,
        request_id="r",
    )
    with pytest.raises(UpstreamError) as info:
        await provider.complete(call)
    assert info.value.status == 502
    assert KEY not in info.value.message


# ---------------------------------------------------------------- embeddings


async def test_embeddings_use_batch_embed_contents(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    out = await provider.embed(
        embed(fake, "text-embedding-004", input=["abc", "defgh"], dimensions=4)
    )
    seen = last_seen(fake)
    assert seen.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert seen.query == {}
    assert headers_of(seen)["x-goog-api-key"] == KEY
    assert seen.body == {
        "requests": [
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": t}]},
                "outputDimensionality": 4,
            }
            for t in ("abc", "defgh")
        ]
    }
    assert out["object"] == "list"
    assert out["model"] == "text-embedding-004"
    assert out["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.1, 0.25, 0.25, 0.25]},
        {"object": "embedding", "index": 1, "embedding": [0.2, 0.25, 0.25, 0.25]},
    ]
    assert out["usage"] == {"prompt_tokens": 2, "total_tokens": 2}  # ceil(8 / 4)


async def test_embeddings_in_base64_and_their_errors(
    fake: FakeServer, provider: GeminiProvider
) -> None:
    out = await provider.embed(embed(fake, "emb", input="hi", encoding_format="base64"))
    assert "outputDimensionality" not in last_seen(fake).body["requests"][0]
    vector = struct.unpack("<8f", base64.b64decode(out["data"][0]["embedding"]))
    assert vector[1:] == (0.25,) * 7
    assert abs(vector[0] - 0.1) < 1e-6
    with pytest.raises(UpstreamStatusError) as info:
        await provider.embed(embed(fake, "fail-429", input="hi"))
    assert (info.value.status, info.value.retry_after) == (429, 2.0)
