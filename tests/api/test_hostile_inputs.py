"""Hostile inputs, by hand: bodies too large or lying about their size, JSON nested past
any parser's stack, bytes that are not UTF-8, wrong content types, values out of range
or of the wrong type in every field, control characters where headers could echo them.

Whatever comes in, the gateway answers an OpenAI-shaped 4xx (never a 5xx) within
`LIMIT_S`, echoes nothing raw into a response header, and serves the next normal
request. Malformed HTTP itself (a header value with a bare CR, a non-numeric
Content-Length) is refused by the HTTP server before the app sees it: there only the
status class is checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from app.config import Settings
from app.main import create_app
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer

MASTER = "fw-master-hostile-0123456789abcdef"
AUTH = {"authorization": f"Bearer {MASTER}"}
JSON_TYPE = {"content-type": "application/json"}
MAX_BODY = 1024 * 1024
LIMIT_S = 5.0
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
HELLO = [{"role": "user", "content": "hello"}]
# What a header value echoed from a request would carry.
EVIL = "\r\nx-evil: 1"
CLIENT_ID = "client-chosen-id"  # the gateway makes its own request ids


@dataclass(frozen=True)
class GatewayClient:
    url: str
    client: httpx.AsyncClient  # one for the module: a client per request costs ~15 ms


@pytest.fixture(scope="module")
async def gw(
    redis_url: str, database_url: str, key_prefix: str, var_dir: Path, openai_upstream: FakeServer
) -> AsyncIterator[GatewayClient]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_url=redis_url,
        database_url=database_url,
        flywheel_redis_prefix=key_prefix,
        flywheel_var_dir=var_dir,
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        flywheel_max_body_bytes=MAX_BODY,
        flywheel_files_max_bytes=64 * 1024,
        openai_api_key="sk-test-secret-0123456789",
        flywheel_http_limit_chat="100000/minute",
        flywheel_http_limit_embeddings="100000/minute",
    )
    behaviour = {"latency_ms": 1, "jitter_ms": 0, "quality": 1.0}
    mock = {"name": "mock-h", "provider": "mock", "model": "mock-h", "mock": behaviour}
    routes = routes_for(
        **{
            "gpt-fake": openai_route(openai_upstream.url),
            "demo": {"deployments": [mock]},
            # Variants and experiments made here belong to this route alone.
            "hostile": {"deployments": [{**mock, "name": "mock-hostile"}]},
        }
    )
    async with (
        Served(create_app(settings, routes)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=LIMIT_S * 2) as client,
    ):
        yield GatewayClient(served.url, client)


async def call(
    gw: GatewayClient,
    method: str,
    path: str,
    *,
    auth: bool = True,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One request, which must be answered within LIMIT_S."""
    sent = {**(AUTH if auth else {}), **(headers or {})}
    started = time.monotonic()
    resp = await gw.client.request(method, path, headers=sent, **kwargs)
    took = time.monotonic() - started
    assert took < LIMIT_S, f"{method} {path} took {took:.1f} s"
    assert_no_echo(resp)
    return resp


def assert_no_echo(resp: httpx.Response) -> None:
    for name, value in resp.headers.raw:
        assert b"\r" not in value, (name, value)
        assert b"\n" not in value, (name, value)
        assert b"\x00" not in value, (name, value)
        assert name.lower() != b"x-evil"


def refused(resp: httpx.Response, *statuses: int) -> dict[str, Any]:
    """An OpenAI-shaped 4xx, one of `statuses` (400 unless told)."""
    expected = statuses or (400,)
    assert resp.status_code in expected, (resp.status_code, resp.text[:500])
    assert 400 <= resp.status_code < 500
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert resp.headers["x-request-id"]
    return dict(error)


def answered(resp: httpx.Response, *statuses: int) -> None:
    """Served (2xx) or refused (an OpenAI-shaped 4xx), as long as it is one of `statuses`."""
    assert resp.status_code in statuses, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        refused(resp, *statuses)


async def alive(gw: GatewayClient) -> None:
    resp = await call(gw, "POST", CHAT, json={"model": "demo", "messages": HELLO})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]


def chat_bytes(**fields: Any) -> bytes:
    return orjson.dumps({"model": "demo", "messages": HELLO, **fields})


def with_content(raw: bytes) -> bytes:
    """A chat body whose message content is `raw`, as it is (escapes and all)."""
    return b'{"model": "demo", "messages": [{"role": "user", "content": "' + raw + b'"}]}'


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


# Bodies that are not a JSON object, whatever the endpoint.
NOT_AN_OBJECT = {
    "empty": b"",
    "whitespace": b" \n\t ",
    "null": b"null",
    "array": b"[]",
    "number": b"1",
    "string": b'"hello"',
    "truncated": b'{"model": "demo", "messages": [',
    "trailing-garbage": chat_bytes() + b"}",
    "nested-100k": nested(100_000),
    "nested-object-in-field": chat_bytes()[:-1] + b',"metadata":' + nested(30_000) + b"}",
    "invalid-utf8": with_content(b"\xff\xfe"),
    "utf8-surrogate": with_content(b"\xed\xa0\x80"),
    "escaped-lone-surrogate": with_content(b"\\ud800"),
    "raw-null-byte": b'{"model": "demo\x00", "messages": []}',
    "nan": chat_bytes()[:-1] + b',"temperature": NaN}',
    "infinity": chat_bytes()[:-1] + b',"temperature": Infinity}',
    "overflowing-number": chat_bytes()[:-1] + b',"temperature": 1e400}',
    "bom": b"\xef\xbb\xbf" + chat_bytes(),
    "single-quotes": b"{'model': 'demo'}",
}


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, "/v1/feedback", "/v1/batches", "/admin/keys"])
@pytest.mark.parametrize("name", list(NOT_AN_OBJECT))
async def test_bodies_that_are_not_a_json_object(gw: GatewayClient, path: str, name: str) -> None:
    body = NOT_AN_OBJECT[name]
    # Feedback and batches take at most 64 KiB: the deepest nestings are too large there.
    statuses = (400, 413) if path in ("/v1/feedback", "/v1/batches") else (400,)
    refused(await call(gw, "POST", path, content=body, headers=JSON_TYPE), *statuses)


async def test_the_gateway_survives_the_bodies(gw: GatewayClient) -> None:
    for path in (CHAT, EMBEDDINGS, "/admin/keys"):
        for body in NOT_AN_OBJECT.values():
            await call(gw, "POST", path, content=body, headers=JSON_TYPE)
    await alive(gw)


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, "/v1/feedback", "/admin/keys"])
async def test_body_over_the_limit_is_413(gw: GatewayClient, path: str) -> None:
    big = b'{"model": "demo", "input": "' + b"x" * (MAX_BODY + 10) + b'"}'
    refused(await call(gw, "POST", path, content=big, headers=JSON_TYPE), 413)


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, "/v1/feedback"])
async def test_chunked_body_over_the_limit_is_413(gw: GatewayClient, path: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "demo", "input": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    resp = await call(gw, "POST", path, content=chunks(), headers=JSON_TYPE)
    assert "content-length" not in resp.request.headers
    assert resp.request.headers["transfer-encoding"] == "chunked"
    refused(resp, 413)
    await alive(gw)


async def raw_http(gw: GatewayClient, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the first response's status, headers and body."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(LIMIT_S):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    assert name.lower() not in headers or name.lower() == "set-cookie"
                    headers[name.lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
    finally:
        writer.close()
    return status, headers, body


def raw_request(path: str, body: bytes, *extra: str, length: str | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "host: 127.0.0.1",
        f"authorization: Bearer {MASTER}",
        "content-type: application/json",
        f"content-length: {len(body) if length is None else length}",
        *extra,
    ]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def raw_refused(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected, (status, body[:300])
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert headers["x-request-id"]


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, "/v1/feedback", "/admin/keys"])
async def test_declared_length_over_the_limit_is_413_before_reading(
    gw: GatewayClient, path: str
) -> None:
    # The body never comes: the answer must not wait for it.
    status, headers, body = await raw_http(gw, raw_request(path, b"{}", length=str(10**12)))
    raw_refused(status, headers, body, 413)


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, "/v1/feedback"])
async def test_declared_length_shorter_than_the_body(gw: GatewayClient, path: str) -> None:
    body = chat_bytes()
    status, headers, answer = await raw_http(gw, raw_request(path, body, length="10"))
    # The app refuses the 10 bytes it was given as JSON; the HTTP server, the rest as a
    # request. Whichever answer comes first is a 400.
    assert status == 400, (status, answer[:300])
    if headers.get("content-type") == "application/json":
        raw_refused(status, headers, answer, 400)
    await alive(gw)


@pytest.mark.parametrize(
    ("extra", "length"),
    [
        pytest.param((), "ten", id="non-numeric-length"),
        pytest.param((), "-5", id="negative-length"),
        pytest.param(("transfer-encoding: chunked",), None, id="length-and-chunked"),
        pytest.param(("x-request-id: a\rb",), None, id="bare-cr-in-header"),
        pytest.param(("x-flywheel-timeout: 5\x00",), None, id="null-byte-in-header"),
        pytest.param(("x-folded: a", " x-evil: 1"), None, id="obs-fold"),
    ],
)
async def test_malformed_http_is_refused(
    gw: GatewayClient, extra: tuple[str, ...], length: str
) -> None:
    status, headers, _ = await raw_http(gw, raw_request(CHAT, chat_bytes(), *extra, length=length))
    # uvicorn's own plain-text 400: the request never reaches the app.
    assert status == 400, status
    assert "x-evil" not in headers
    await alive(gw)


@pytest.mark.parametrize(
    ("content_type", "body", "statuses"),
    [
        # A JSON body under another content type is read as JSON (curl -d sends form).
        ("text/plain", chat_bytes(), (200, 400, 415)),
        ("application/x-www-form-urlencoded", chat_bytes(), (200, 400, 415)),
        (None, chat_bytes(), (200, 400, 415)),
        ("application/x-www-form-urlencoded", b"model=demo&messages=hi", (400, 415)),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\nhi\r\n--x--\r\n", (400, 415)),
        ("application/json; charset=utf-16", "{}".encode("utf-16"), (400, 415)),
        ("application/json", b"model=demo", (400,)),
    ],
)
@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, "/admin/keys"])
async def test_content_types(
    gw: GatewayClient, path: str, content_type: str | None, body: bytes, statuses: tuple[int, ...]
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    if path == "/admin/keys" and 200 in statuses:
        statuses = (*statuses, 201)
    answered(await call(gw, "POST", path, content=body, headers=headers), *statuses)


async def test_ten_thousand_messages_are_served_in_bounded_time(gw: GatewayClient) -> None:
    """The gateway sets no limit on the number of messages (OpenAI's is the context
    window, the upstream's to enforce); only the body's size is limited."""
    messages = [{"role": "user", "content": f"message {i}"} for i in range(10_000)]
    for model in ("demo", "gpt-fake"):
        for stream in (False, True):
            body = {"model": model, "messages": messages, "stream": stream}
            resp = await call(gw, "POST", CHAT, json=body)
            assert resp.status_code == 200, resp.text[:300]
    await alive(gw)


CHAT_REFUSED: dict[str, dict[str, Any]] = {
    "no-messages": {"messages": []},
    "messages-missing": {"messages": None},
    "messages-string": {"messages": "hello"},
    "messages-object": {"messages": {"role": "user", "content": "hi"}},
    "unknown-role": {"messages": [{"role": "robot", "content": "hi"}]},
    "role-missing": {"messages": [{"content": "hi"}]},
    "role-number": {"messages": [{"role": 1, "content": "hi"}]},
    "content-number": {"messages": [{"role": "user", "content": 5}]},
    "content-object": {"messages": [{"role": "user", "content": {"text": "hi"}}]},
    "unknown-part": {"messages": [{"role": "user", "content": [{"type": "evil", "x": 1}]}]},
    "message-not-object": {"messages": ["hi"]},
    "tool-without-id": {"messages": [{"role": "tool", "content": "x"}]},
    "max-tokens-negative": {"max_tokens": -1},
    "max-tokens-zero": {"max_tokens": 0},
    "max-tokens-float": {"max_tokens": 1.5},
    "max-tokens-string": {"max_tokens": "many"},
    "max-completion-tokens-zero": {"max_completion_tokens": 0},
    "n-zero": {"n": 0},
    "n-negative": {"n": -1},
    "n-huge": {"n": 10**30},
    "n-over-max": {"n": 129},
    "temperature-negative": {"temperature": -0.1},
    "temperature-over": {"temperature": 2.1},
    "temperature-huge": {"temperature": 10**400},
    "temperature-string": {"temperature": "hot"},
    "top-p-over": {"top_p": 1.5},
    "presence-penalty-over": {"presence_penalty": 3},
    "top-logprobs-over": {"top_logprobs": 21},
    "model-empty": {"model": ""},
    "model-number": {"model": 7},
    "model-null": {"model": None},
    "model-list": {"model": ["demo"]},
    "tools-garbage": {"tools": [{"type": "function", "function": {"parameters": "x"}}]},
    "tool-choice-garbage": {"tool_choice": "sometimes"},
    "response-format-unknown": {"response_format": {"type": "yaml"}},
    "stream-options-string": {"stream": True, "stream_options": "yes"},
    "stop-number": {"stop": 5},
    "logit-bias-strings": {"logit_bias": {"1": "high"}},
    "metadata-nested": {"metadata": {"a": {"b": 1}}},
}


@pytest.mark.parametrize("name", list(CHAT_REFUSED))
async def test_chat_values_out_of_range_or_of_the_wrong_type(gw: GatewayClient, name: str) -> None:
    fields = CHAT_REFUSED[name]
    body = {"model": "demo", "messages": HELLO, **fields}
    for model in ("demo", "gpt-fake"):
        body["model"] = fields.get("model", model)
        resp = await call(gw, "POST", CHAT, json=body, headers={"x-request-id": CLIENT_ID})
        error = refused(resp, 400, 404)
        assert resp.headers["x-request-id"] != CLIENT_ID, "a client's request id is echoed"
        assert error["type"] == "invalid_request_error"


def deep_schema(depth: int) -> dict[str, Any]:
    """An object schema nested `depth` levels (within JSON parsers' depth limits, well
    past what recursive validators take)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


TEXT_PART = {"type": "text", "text": "a"}
CHAT_SERVED: dict[str, dict[str, Any]] = {
    "max-tokens-huge": {"max_tokens": 10**30},
    "max-completion-tokens-huge": {"max_completion_tokens": 2**63},
    "seed-huge": {"seed": 10**30},
    "n-max": {"n": 128},
    "null-byte-content": {"messages": [{"role": "user", "content": "a\u0000b"}]},
    "control-characters": {"messages": [{"role": "user", "content": "".join(map(chr, range(32)))}]},
    "astral-unicode": {"messages": [{"role": "user", "content": "\U0001f600\U0010ffff"}]},
    "long-content": {"messages": [{"role": "user", "content": "x" * 500_000}]},
    "many-parts": {"messages": [{"role": "user", "content": [TEXT_PART] * 5000}]},
    "stop-many": {"stop": ["x"] * 10_000},
    "logit-bias-many": {"logit_bias": {str(i): 1 for i in range(20_000)}},
    "user-long": {"user": "u" * 100_000},
    "unknown-fields": {"x-evil": EVIL, "nested": {"deep": [[[[1]]]]}},
    # Past what the serializers write (orjson: 254 levels): refused, never a 500.
    "schema-deep": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "deep", "schema": deep_schema(300)},
        }
    },
    # Deep, but within the gateway's limit (200 levels): served.
    "schema-fairly-deep": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "deep", "schema": deep_schema(90)},
        }
    },
    "unknown-field-deep": {"extra": orjson.loads(nested(190))},
    "unknown-field-too-deep": {"extra": orjson.loads(nested(250))},
    "schema-odd-properties": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "odd", "schema": {"type": "object", "properties": [1, 2]}},
        }
    },
    "schema-odd-enum": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "odd", "schema": {"enum": {"a": 1}}},
        }
    },
    "schema-self-ref": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "loop",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#"}}},
                "strict": True,
            },
        }
    },
    "tool-schema-self-ref": {
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"$ref": "#", "type": "object"}},
            }
        ],
        "tool_choice": "required",
    },
}


@pytest.mark.parametrize("name", list(CHAT_SERVED))
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_edge_values_are_served_or_refused(
    gw: GatewayClient, name: str, stream: bool
) -> None:
    body = {"model": "demo", "messages": HELLO, **CHAT_SERVED[name], "stream": stream}
    for model in ("demo", "gpt-fake"):
        resp = await call(gw, "POST", CHAT, json={**body, "model": model})
        answered(resp, 200, 400)
        if name in ("schema-fairly-deep", "unknown-field-deep"):
            assert resp.status_code == 200, resp.text[:300]
        if name in ("schema-deep", "unknown-field-too-deep"):
            assert refused(resp)["code"] == "invalid_json"
        if resp.status_code == 200 and stream:
            assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
    await alive(gw)


WRONG_TYPES: list[Any] = [123, -1, 1.5, "x", "", [], [None], {}, {"a": [1]}, True, None]


async def test_every_chat_field_with_every_wrong_type(gw: GatewayClient) -> None:
    fields = [
        "model", "messages", "stream", "stream_options", "temperature", "top_p", "n",
        "max_tokens", "max_completion_tokens", "stop", "seed", "user", "metadata",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
        "tools", "tool_choice", "parallel_tool_calls", "response_format",
    ]  # fmt: skip
    message_fields = ["role", "content", "name", "tool_calls", "tool_call_id"]
    for value in WRONG_TYPES:
        for field in fields:
            body = {"model": "demo", "messages": HELLO, field: value}
            answered(await call(gw, "POST", CHAT, json=body), 200, 400, 404)
        for field in message_fields:
            message = {"role": "assistant", "content": "hi", field: value}
            body = {"model": "demo", "messages": [*HELLO, message, *HELLO]}
            answered(await call(gw, "POST", CHAT, json=body), 200, 400)
    await alive(gw)


async def test_every_embeddings_field_with_every_wrong_type(gw: GatewayClient) -> None:
    for value in [*WRONG_TYPES, [[]], [""], [10**30], [[-1, 2**64]], ["x"] * 2049]:
        for field in ("model", "input", "encoding_format", "dimensions", "user"):
            for model in ("demo", "gpt-fake"):
                body = {"model": model, "input": "hello", field: value}
                answered(await call(gw, "POST", EMBEDDINGS, json=body), 200, 400, 404)
    await alive(gw)


@pytest.mark.parametrize(
    "model",
    [
        "m" * 100_000,
        "demo" + EVIL,
        "demo\u0000",
        "\U0001f600",
        "../../admin",
        "demo\u202e",
        " demo ",
    ],
    ids=["long", "crlf", "null", "emoji", "traversal", "bidi", "spaces"],
)
@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS])
async def test_model_names_that_are_not_routes(gw: GatewayClient, path: str, model: str) -> None:
    body = {"model": model, "messages": HELLO, "input": "x"}
    resp = await call(gw, "POST", path, json=body)
    error = refused(resp, 404)
    assert error["code"] == "model_not_found"
    assert len(resp.content) < 8 * 1024 + len(model) * 2, "the error is out of proportion"
    for header in ("x-flywheel-route", "x-flywheel-deployment"):
        assert header not in resp.headers or resp.headers[header] != model
    resp = await call(gw, "GET", "/v1/models/" + quote(model[:2000], safe=""))
    refused(resp, 400, 404)


BAD_TIMEOUTS = ["nan", "inf", "-1", "1e309", "", "0x10"]
BAD_KEYS = ["Bearer " + "k" * 60_000, "Bearer \u00ff\u00fe", "Basic " + MASTER, "Bearer"]


@pytest.mark.parametrize(
    ("header", "value", "chat", "others"),
    [
        # Refused where it applies (a 400 naming it), ignored where it does not.
        *[("x-flywheel-timeout", v, 400, 200) for v in BAD_TIMEOUTS],
        # The cache is off: its TTL is not read.
        ("x-flywheel-cache-ttl", "nan", 200, 200),
        ("cache-control", "no-cache,,,;;;==,no-store=\u00ff", 200, 200),
        *[("authorization", v, 401, 401) for v in BAD_KEYS],
        ("authorization", "bearer  " + MASTER + " extra", 401, 401),
        ("x-request-id", "x" * 10_000, 200, 200),
    ],
)
async def test_hostile_headers(
    gw: GatewayClient, header: str, value: str, chat: int, others: int
) -> None:
    for path in (CHAT, "/v1/models", "/admin/keys"):
        method = "POST" if path == CHAT else "GET"
        # As bytes: header values are latin-1 on the wire.
        sent: Any = {**JSON_TYPE, header: value.encode("latin-1")}
        resp = await call(gw, method, path, content=chat_bytes(), headers=sent)
        answered(resp, chat if path == CHAT else others)
    await alive(gw)


FEEDBACK_REFUSED: dict[str, dict[str, Any]] = {
    "empty": {},
    "id-missing": {"score": 1},
    "id-long": {"id": "x" * 10_000, "score": 1},
    "id-number": {"id": 5, "score": 1},
    "score-negative": {"id": "chatcmpl-x", "score": -0.1},
    "score-over": {"id": "chatcmpl-x", "score": 1.5},
    "score-huge": {"id": "chatcmpl-x", "score": 10**400},
    "score-string": {"id": "chatcmpl-x", "score": "good"},
    "thumbs-sideways": {"id": "chatcmpl-x", "thumbs": "sideways"},
    "both": {"id": "chatcmpl-x", "score": 1, "thumbs": "up"},
    "neither": {"id": "chatcmpl-x"},
    "comment-long": {"id": "chatcmpl-x", "score": 1, "comment": "c" * 5000},
    "extra-field": {"id": "chatcmpl-x", "score": 1, "evil": True},
}


@pytest.mark.parametrize("name", list(FEEDBACK_REFUSED))
async def test_feedback_refuses(gw: GatewayClient, name: str) -> None:
    refused(await call(gw, "POST", "/v1/feedback", json=FEEDBACK_REFUSED[name]))


@pytest.mark.parametrize(
    "request_id", ["chatcmpl-unknown", "a\u0000b", "x" + EVIL, "\U0001f600", "' OR 1=1 --"]
)
async def test_feedback_for_what_does_not_exist_is_404(gw: GatewayClient, request_id: str) -> None:
    resp = await call(gw, "POST", "/v1/feedback", json={"id": request_id, "score": 0.5})
    # No id holds a NUL: that one is a bad value (it was accepted, the database being
    # taken for down when it refused to look it up).
    refused(resp, 400 if "\x00" in request_id else 404)
    await alive(gw)


async def test_feedback_comment_the_database_could_not_keep(gw: GatewayClient) -> None:
    resp = await call(gw, "POST", CHAT, json={"model": "demo", "messages": HELLO})
    request_id = resp.json()["id"].encode()
    for comment in (rb"a\u0000b", rb"\ud800"):
        body = b'{"id": "' + request_id + b'", "score": 1, "comment": "' + comment + b'"}'
        resp = await call(gw, "POST", "/v1/feedback", content=body, headers=JSON_TYPE)
        assert refused(resp)["code"] in ("invalid_value", "invalid_json")


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "hostile") -> bytes:
    """A form by hand: (name, filename or None, content) per part."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\ncontent-disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


FORM = {"content-type": "multipart/form-data; boundary=hostile"}
BATCH_LINE = orjson.dumps(
    {
        "custom_id": "1",
        "method": "POST",
        "url": CHAT,
        "body": {"model": "demo", "messages": HELLO},
    }
)


@pytest.mark.parametrize(
    ("headers", "body", "statuses"),
    [
        pytest.param(JSON_TYPE, chat_bytes(), (400,), id="json"),
        pytest.param({}, b"", (400,), id="no-content-type"),
        pytest.param({"content-type": "multipart/form-data"}, b"", (400,), id="no-boundary"),
        pytest.param(FORM, b"", (400,), id="empty-form"),
        pytest.param(FORM, b"--hostile\r\n\r\nunterminated", (400,), id="unterminated"),
        pytest.param(FORM, multipart(("purpose", None, b"batch")), (400,), id="no-file"),
        pytest.param(FORM, multipart(("file", "a.jsonl", BATCH_LINE)), (400,), id="no-purpose"),
        pytest.param(
            FORM,
            multipart(("file", "a.jsonl", BATCH_LINE), ("purpose", None, b"fine-tune")),
            (400,),
            id="bad-purpose",
        ),
        pytest.param(
            FORM,
            multipart(("file", "a.jsonl", b"not json\n"), ("purpose", None, b"batch")),
            (400,),
            id="not-jsonl",
        ),
        pytest.param(
            FORM,
            multipart(("file", "a.jsonl", b"[" * 5000 + b"]" * 5000), ("purpose", None, b"batch")),
            (400,),
            id="nested-line",
        ),
        pytest.param(
            FORM,
            multipart(("file", "a.jsonl", b"\xff\xfe\n"), ("purpose", None, b"batch")),
            (400,),
            id="not-utf8",
        ),
        pytest.param(
            FORM,
            multipart(("file", "a.jsonl", b"x" * 70 * 1024), ("purpose", None, b"batch")),
            (413,),
            id="too-large",
        ),
        pytest.param(
            FORM,
            multipart(
                ("file", "a.jsonl", BATCH_LINE),
                ("purpose", None, b"batch"),
                ("expires_after[anchor]", None, b"created_at"),
                ("expires_after[seconds]", None, b"99999999999999999999"),
            ),
            (400,),
            id="expiry-huge",
        ),
        pytest.param(
            FORM,
            multipart(("file", "a.jsonl", BATCH_LINE), ("purpose", None, b"\xff")),
            (400,),
            id="field-not-utf8",
        ),
    ],
)
async def test_file_uploads_refused(
    gw: GatewayClient, headers: dict[str, str], body: bytes, statuses: tuple[int, ...]
) -> None:
    refused(await call(gw, "POST", "/v1/files", content=body, headers=headers), *statuses)


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd",
        "a\u0000b.jsonl",
        "x" * 1000 + ".jsonl",
        "\U0001f600.jsonl",
        'q"uote;.jsonl',
        "C:\\\\Windows\\\\evil.jsonl",
    ],
    ids=["traversal", "null", "long", "emoji", "quote", "windows"],
)
async def test_file_names_are_kept_harmless(gw: GatewayClient, filename: str) -> None:
    body = multipart(("file", filename, BATCH_LINE), ("purpose", None, b"batch"))
    resp = await call(gw, "POST", "/v1/files", content=body, headers=FORM)
    assert resp.status_code == 200, resp.text
    file_id, kept = resp.json()["id"], resp.json()["filename"]
    assert "/" not in kept
    assert kept.isprintable()
    got = await call(gw, "GET", f"/v1/files/{file_id}/content")
    assert got.status_code == 200
    assert got.content == BATCH_LINE
    assert (await call(gw, "DELETE", f"/v1/files/{file_id}")).status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/v1/files/%00", "/v1/files/" + "f" * 300, "/v1/files/..%2F..%2Fetc", "/v1/files/%ff%fe"],
)
async def test_file_ids_that_are_not(gw: GatewayClient, path: str) -> None:
    for suffix in ("", "/content"):
        refused(await call(gw, "GET", path + suffix), 400, 404)
    refused(await call(gw, "DELETE", path), 400, 404)


KEY_REFUSED: dict[str, dict[str, Any]] = {
    "name-missing": {},
    "name-empty": {"name": ""},
    "name-long": {"name": "n" * 201},
    "name-number": {"name": 5},
    "name-list": {"name": ["a"]},
    "rpm-zero": {"rpm": 0},
    "rpm-negative": {"rpm": -1},
    "rpm-over-int32": {"rpm": 2**31},
    "rpm-huge": {"rpm": 10**30},
    "rpm-fraction": {"rpm": 1.5},
    "tpm-over-int32": {"tpm": 2**31},
    "tpm-huge": {"tpm": 10**400},
    "budget-negative": {"budget_usd": -1},
    "budget-string": {"budget_usd": "lots"},
    "period-unknown": {"budget_period": "year"},
    "expires-garbage": {"expires_at": "soon"},
    "expires-year-0": {"expires_at": "0000-01-01T00:00:00Z"},
    "routes-string": {"allowed_routes": "demo"},
    "routes-numbers": {"allowed_routes": [1, 2]},
    "metadata-list": {"metadata": [1]},
    "unknown-field": {"admin": True},
}


@pytest.mark.parametrize("name", list(KEY_REFUSED))
async def test_admin_key_values_refused(gw: GatewayClient, name: str) -> None:
    body = {"name": "hostile", **KEY_REFUSED[name]}
    if name == "name-missing":
        del body["name"]
    refused(await call(gw, "POST", "/admin/keys", json=body))
    refused(await call(gw, "PATCH", "/admin/keys/key_" + "0" * 24, json=body), 400, 404)


KEY_RAW: dict[str, bytes] = {
    "budget-overflowing": b'{"name": "hostile", "budget_usd": 1e400}',
    "budget-nan": b'{"name": "hostile", "budget_usd": NaN}',
    "budget-infinity": b'{"name": "hostile", "budget_usd": Infinity}',
    "rpm-overflowing": b'{"name": "hostile", "rpm": 1e400}',
    "escaped-lone-surrogate": b'{"name": "a\\ud800b"}',
    "utf8-surrogate": b'{"name": "a\xed\xa0\x80b"}',
    "escaped-null": b'{"name": "a\\u0000b"}',
    "metadata-null-key": b'{"name": "hostile", "metadata": {"a\\u0000": "b\\u0000"}}',
    "metadata-surrogate": b'{"name": "hostile", "metadata": {"k": "\\udfff"}}',
    "routes-null": b'{"name": "hostile", "allowed_routes": ["demo\\u0000"]}',
    "metadata-deep": b'{"name": "hostile", "metadata": {"a": ' + nested(5000) + b"}}",
    "metadata-300": b'{"name": "hostile", "metadata": {"a": ' + nested(300) + b"}}",
    "metadata-600": b'{"name": "hostile", "metadata": {"a": ' + nested(600) + b"}}",
    "metadata-900": b'{"name": "hostile", "metadata": {"a": ' + nested(900) + b"}}",
    "expires-far": b'{"name": "hostile", "expires_at": "9999-12-31T23:59:59-23:59"}',
    "expires-early": b'{"name": "hostile", "expires_at": "0001-01-01T00:00:00+23:59"}',
    "expires-huge-number": b'{"name": "hostile", "expires_at": 1e300}',
}


@pytest.mark.parametrize("name", list(KEY_RAW))
async def test_admin_key_bodies_are_stored_or_refused(gw: GatewayClient, name: str) -> None:
    resp = await call(gw, "POST", "/admin/keys", content=KEY_RAW[name], headers=JSON_TYPE)
    answered(resp, 201, 400)
    if resp.status_code == 201:
        key = resp.json()
        got = await call(gw, "GET", f"/admin/keys/{key['id']}")
        assert got.status_code == 200, got.text
        assert (await call(gw, "DELETE", f"/admin/keys/{key['id']}")).status_code == 200
    resp = await call(gw, "PATCH", "/admin/keys/key_" + "0" * 24, content=KEY_RAW[name],
                      headers=JSON_TYPE)  # fmt: skip
    answered(resp, 400, 404)
    await alive(gw)


VARIANT_RAW: dict[str, bytes] = {
    "param-overflowing": b'{"route": "hostile", "name": "v", "params": {"temperature": 1e400}}',
    "param-nan": b'{"route": "hostile", "name": "v", "params": {"temperature": NaN}}',
    "param-huge-int": b'{"route": "hostile", "name": "v", "params": {"seed": 1' + b"0" * 40 + b"}}",
    "prompt-null": b'{"route": "hostile", "name": "v", "system_prompt": "a\\u0000b"}',
    "prompt-surrogate": b'{"route": "hostile", "name": "v", "system_prompt": "\\ud800"}',
    "name-null": b'{"route": "hostile", "name": "v\\u0000", "system_prompt": "x"}',
    "route-null": b'{"route": "hostile\\u0000", "name": "v", "system_prompt": "x"}',
}


@pytest.mark.parametrize("name", list(VARIANT_RAW))
async def test_variant_bodies_are_stored_or_refused(gw: GatewayClient, name: str) -> None:
    path = "/v1/virtuous-cycle/variants"
    resp = await call(gw, "POST", path, content=VARIANT_RAW[name], headers=JSON_TYPE)
    answered(resp, 201, 400, 404)
    if resp.status_code == 201:
        variant = resp.json()
        got = await call(gw, "GET", f"{path}/{variant['id']}")
        assert got.status_code == 200, got.text
        assert (await call(gw, "POST", f"{path}/{variant['id']}/retire")).status_code == 200
    await alive(gw)


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("GET", CHAT, (405,)),
        ("PUT", EMBEDDINGS, (405,)),
        ("DELETE", "/v1/feedback", (405,)),
        ("OPTIONS", CHAT, (405,)),
        ("GET", CHAT + "/", (404,)),
        ("GET", "/nope", (404,)),
        ("GET", "/" + "a" * 8000, (404,)),
        ("GET", "/v1/models/%00", (400, 404)),
        ("GET", "/v1/models/%ff%fe", (404,)),
        ("GET", "/v1/models/..%2Fadmin", (404,)),
        ("GET", "/admin/keys/%0d%0ax-evil:%201", (400, 404)),
        ("GET", "/admin/requests/" + "r" * 5000, (400, 404)),
        ("GET", "/admin/requests?limit=-1", (400,)),
        ("GET", "/admin/requests?limit=99999999999999999999999", (400,)),
        ("GET", "/admin/requests?since=yesterday", (400,)),
        ("GET", "/admin/requests?since=1e400", (400,)),
        ("GET", "/metrics/history?hours=nan", (400,)),
        ("GET", "/metrics/history?hours=1&hours=2&hours=x", (200, 400)),
        ("GET", "/admin/alerts?since=%00", (400,)),
        ("GET", "/v1/virtuous-cycle/runs?before=0000-00-00", (400,)),
        ("GET", "/v1/virtuous-cycle/datasets?min_quality=nan", (200, 400)),
        ("GET", "/v1/virtuous-cycle/datasets?min_quality=inf", (200, 400)),
        ("GET", "/v1/files?limit=0", (400,)),
        ("GET", "/v1/files?after=" + "%00" * 10, (200, 400)),
        ("GET", "/v1/batches/" + "b" * 1000, (400, 404)),
    ],
)
async def test_methods_paths_and_queries(
    gw: GatewayClient, method: str, path: str, statuses: tuple[int, ...]
) -> None:
    answered(await call(gw, method, path), *statuses)
    await alive(gw)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 10**30},
        {"max_tokens": 2**63},
        {"max_completion_tokens": 10**30, "n": 128},
        {"n": 10**30},
        {"n": -(10**30), "max_tokens": -(10**30)},
        {"max_tokens": 1e300},
        {"max_tokens": True},
        {"messages": [{"role": "user", "content": "x" * 200_000}]},
    ],
    ids=["huge", "int64", "huge-times-n", "n-huge", "negative", "float", "bool", "long"],
)
async def test_limited_key_reserves_what_it_is_asked_or_refuses(
    gw: GatewayClient, fields: dict[str, Any]
) -> None:
    """A key with token and budget limits reserves from the raw body (before it is
    validated, on the early-route path): absurd numbers there are a 400 or a 429."""
    resp = await call(
        gw,
        "POST",
        "/admin/keys",
        json={
            "name": "hostile-limited",
            "tpm": 10_000,
            "budget_usd": 1.0,
            "allowed_routes": ["demo"],
        },
    )
    assert resp.status_code == 201, resp.text
    key = resp.json()
    own = {"authorization": f"Bearer {key['key']}"}
    try:
        body = {"model": "demo", "messages": HELLO, **fields}
        for stream in (False, True):
            resp = await call(
                gw, "POST", CHAT, auth=False, headers=own, json={**body, "stream": stream}
            )
            answered(resp, 200, 400, 429)
        resp = await call(
            gw, "POST", CHAT, auth=False, headers=own, json={"model": "demo", "messages": HELLO}
        )
        answered(resp, 200, 429)
    finally:
        assert (await call(gw, "DELETE", f"/admin/keys/{key['id']}")).status_code == 200


@pytest.mark.parametrize(
    "metadata", [rb'{"k": "a\u0000b"}', rb'{"k\u0000": "b"}', rb'{"k": "\udc00"}']
)
async def test_batch_metadata_the_database_could_not_keep(
    gw: GatewayClient, metadata: bytes
) -> None:
    body = (
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", '
        b'"completion_window": "24h", "metadata": ' + metadata + b"}"
    )
    resp = await call(gw, "POST", "/v1/batches", content=body, headers=JSON_TYPE)
    assert refused(resp)["code"] in ("invalid_value", "invalid_json")
