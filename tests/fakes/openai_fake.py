"""A fake OpenAI server: chat completions (JSON and SSE) and embeddings, with faults."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, FakeState, fault_of, remember, wait_or_disconnect


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": "2"} if status == 429 else {}
    kind = (
        "rate_limit_error"
        if status == 429
        else ("invalid_request_error" if status < 500 else "server_error")
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def _last_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1].get("content") or ""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return str(content)


def _tool_calls(body: dict[str, Any], kind: str = "") -> list[dict[str, Any]]:
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") == "none" or body["messages"][-1]["role"] == "tool":
        return []
    chosen = tools if body.get("parallel_tool_calls", True) else tools[:1]
    return [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": t["function"]["name"],
                "arguments": '{"q": ' if kind == "bad-args" else json.dumps({"q": i}),
            },
        }
        for i, t in enumerate(chosen)
    ]


# What the `optimizer` model proposes: four prompts, the second one twice (case and
# spacing aside), which a reader of the reply drops.
OPTIMIZER_PROMPTS = (
    "You are a careful assistant. Answer the question asked, completely and accurately.",
    "Answer concisely. If the request is ambiguous, state your assumption first.",
    "answer concisely.  if the request is ambiguous, state your assumption first.",
    "Think step by step, then give only the final answer, in the format requested.",
    "Be helpful and precise; never refuse a reasonable request.",
)


def answer_text(body: dict[str, Any], kind: str = "") -> str:
    if kind == "judge":
        return 'Verdict:\n```json\n{"score": 8, "reason": "Correct and clear."}\n```'
    if kind == "optimizer":
        return json.dumps(list(OPTIMIZER_PROMPTS))
    if kind == "refuse":
        return "I'm sorry, but I can't help with that."
    if kind == "bad-json":
        return 'Sure! Here it is: {"answer": 42'
    fmt = (body.get("response_format") or {}).get("type")
    if fmt == "json_schema":
        props = body["response_format"]["json_schema"].get("schema", {}).get("properties", {})
        if not isinstance(props, dict):
            props = {}  # not a schema; the answer need not match it
        string = "x" if kind != "off-schema" else 1
        other = 1 if kind != "off-schema" else "x"

        def typed(v: Any) -> Any:
            return string if isinstance(v, dict) and v.get("type") == "string" else other

        return json.dumps({k: typed(v) for k, v in props.items()})
    if fmt == "json_object":
        return json.dumps({"answer": _last_text(body)})
    return f"Echo: {_last_text(body)}"


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4 + 1
    done = len(text) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _chat(state: FakeState, request: web.Request) -> web.StreamResponse:
    body = await remember(state, request)
    if not request.headers.get("authorization", "").startswith("Bearer "):
        return _error(401, "Incorrect API key provided: sk-fake-leak-1234567890.")
    model = str(body.get("model", ""))
    kind, value = fault_of(model)
    if kind == "cap":
        return await _capped(state, request, body, model, value)
    if kind == "fail" or (kind == "toggle" and model in state.failing):
        return _error(value or 500, f"fake failure {value or 500}")
    if kind == "ctx-exceeded":
        body_ = {
            "error": {
                "message": "This model's maximum context length is 8192 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
        return web.json_response(body_, status=400)
    if kind == "echo-error":
        # Upstreams quote the offending input back in their error messages.
        quoted = str((body.get("messages") or [{}])[-1].get("content"))
        return _error(400, f"Invalid 'messages[0].content': could not process {quoted!r}")
    if kind == "lag":
        await asyncio.sleep(state.lag_ms / 1000)
    if kind == "slow" and not await wait_or_disconnect(state, request, value / 1000):
        return web.Response(status=499)
    if kind == "weird":
        return await _weird(request, body)
    calls = _tool_calls(body, kind)
    text = "" if calls else answer_text(body, kind)
    finish = "tool_calls" if calls else ("length" if kind == "length" else "stop")
    if body.get("stream"):
        return await _stream(state, request, body, text, calls, finish, kind, value)
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    state.answered[_last_text(body)] += 1
    return web.json_response(
        {
            "id": "chatcmpl-upstream",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": _usage(body, text),
        },
        headers=_rate_headers(model),
    )


def _rate_headers(model: str) -> dict[str, str]:
    """OpenAI's rate-limit headers; `exhausted` says the request budget is used up."""
    if model == "exhausted":
        return {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    return {"x-ratelimit-remaining-requests": "99", "x-ratelimit-reset-requests": "6m0s"}


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _stream(
    state: FakeState,
    request: web.Request,
    body: dict[str, Any],
    text: str,
    calls: list[dict[str, Any]],
    finish: str,
    kind: str,
    value: int,
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    state.open_streams += 1
    pieces: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if kind == "drip":
        pieces += [{"content": f"tick{i} "} for i in range(2000)]
    else:
        pieces += [{"content": w + " "} for w in text.split(" ") if text]
    for i, call in enumerate(calls):
        pieces.append(
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""},
                    }
                ]
            }
        )
        args = call["function"]["arguments"]
        pieces.append({"tool_calls": [{"index": i, "function": {"arguments": args[:4]}}]})
        pieces.append({"tool_calls": [{"index": i, "function": {"arguments": args[4:]}}]})
    try:
        for n, delta in enumerate(pieces):
            if kind == "cut" and n > value:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if kind == "malformed" and n == 2:
                await resp.write(b"data: {not json\n\n")
            await resp.write(_chunk(body, delta))
            if kind == "drip":
                await asyncio.sleep(value / 1000)
        await resp.write(_chunk(body, {}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": "chatcmpl-upstream",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [],
                "usage": _usage(body, text),
            }
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        state.disconnects.append(time.monotonic())
        raise
    finally:
        state.closed_streams += 1
    return resp


async def _capped(
    state: FakeState, request: web.Request, body: dict[str, Any], model: str, cap: int
) -> web.StreamResponse:
    """An upstream that can serve `cap` requests at once and says 429 past that."""
    now = state.in_flight.get(model, 0) + 1
    if now > cap:
        state.rejected[model] = state.rejected.get(model, 0) + 1
        err = {
            "error": {
                "message": "Rate limit reached",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        return web.json_response(err, status=429)
    state.in_flight[model] = now
    state.peak_in_flight[model] = max(state.peak_in_flight.get(model, 0), now)
    try:
        await asyncio.sleep(0.05)
    finally:
        state.in_flight[model] -= 1
    text = answer_text(body)
    return web.json_response(
        {
            "id": "chatcmpl-upstream",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(body, text),
        }
    )


async def _weird(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Valid JSON of the wrong shape: choices that are not objects, deltas that are not."""
    if not body.get("stream"):
        return web.json_response({"id": "x", "object": "chat.completion", "choices": ["oops"]})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk(body, {"role": "assistant", "content": ""}))
    bad = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": "oops"}]}
    await resp.write(b"data: " + json.dumps(bad).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _embeddings(state: FakeState, request: web.Request) -> web.Response:
    body = await remember(state, request)
    kind, value = fault_of(str(body.get("model", "")))
    if kind == "fail":
        return _error(value, f"fake failure {value}")
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
        for i, _ in enumerate(inputs)
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }
    )


def make_app(state: FakeState) -> web.Application:
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _chat(state, request)

    async def embeddings(request: web.Request) -> web.Response:
        return await _embeddings(state, request)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def openai_fake() -> FakeServer:
    return FakeServer(make_app)
