"""A fake Anthropic Messages API: POST /v1/messages, JSON and SSE, with faults.

It speaks the real wire format (headers, error shape, named SSE events) and checks the
request the way Anthropic does where a translation bug would show: roles, required
`max_tokens`, tool results that answer a tool_use of the previous assistant turn.

Besides the fault modes of tests/fakes/server.py, chosen by model name:
  overloaded-mid  stream a few deltas, then an `error` event (overloaded_error)
  cached-<any>    a normal answer whose usage reports cache reads and writes
An `x-api-key` starting with "bad" gets a 401 that echoes the key, as a careless
upstream might, so tests can prove the gateway scrubs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, FakeState, fault_of, remember

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_BLOCK_TYPES = {"text", "image", "document", "tool_use", "tool_result"}
TOOL_PREAMBLE = "Let me call the tools."

Block = dict[str, Any]


def _error(status: int, message: str) -> web.Response:
    headers = {"request-id": "req_fake"}
    if status == 429:
        headers["retry-after"] = "2"
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _blocks(content: Any) -> list[Block]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _invalid(body: Any) -> str | None:
    """Anthropic's complaint about a request, or None when it would be accepted."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Field required"
    if not 0 <= body.get("temperature", 0) <= 1:
        return "temperature: Input should be less than or equal to 1"
    if "tool_choice" in body and not body.get("tools"):
        return "tool_choice may only be specified while providing tools"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    asked: set[str] = set()
    for i, message in enumerate(messages):
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        blocks = _blocks(message.get("content"))
        if not blocks:
            return f"messages.{i}: all messages must have non-empty content"
        for block in blocks:
            if block.get("type") not in _BLOCK_TYPES:
                return f"messages.{i}.content: unknown block type {block.get('type')!r}"
            if block["type"] == "tool_result" and block.get("tool_use_id") not in asked:
                return f"messages.{i}: tool_result without a matching tool_use block"
        asked = {b["id"] for b in blocks if b["type"] == "tool_use"}
    return None


def _last_user(body: dict[str, Any]) -> list[Block]:
    last = body["messages"][-1]
    return _blocks(last["content"]) if last["role"] == "user" else []


def _text_of(blocks: list[Block]) -> str:
    texts: list[str] = []
    for block in blocks:
        if block["type"] == "text":
            texts.append(block["text"])
        elif block["type"] == "tool_result":
            texts.append(" ".join(b.get("text", "") for b in _blocks(block.get("content", ""))))
    return " ".join(texts)


def _tool_uses(body: dict[str, Any]) -> list[Block]:
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {"type": "auto"}
    answered = any(b["type"] == "tool_result" for b in _last_user(body))
    if not tools or choice["type"] == "none" or answered:
        return []
    if choice["type"] == "tool":
        tools = [t for t in tools if t["name"] == choice["name"]]
    if choice.get("disable_parallel_tool_use"):
        tools = tools[:1]
    return [
        {"type": "tool_use", "id": f"toolu_{i:02d}", "name": t["name"], "input": {"q": i}}
        for i, t in enumerate(tools)
    ]


def _answer(body: dict[str, Any]) -> tuple[list[Block], str, str | None]:
    """(content blocks, stop_reason, stop_sequence) of the fake's answer."""
    calls = _tool_uses(body)
    if calls:
        return [{"type": "text", "text": TOOL_PREAMBLE}, *calls], "tool_use", None
    asked = _text_of(_last_user(body))
    system = body.get("system")
    text = json.dumps({"answer": asked}) if "JSON" in str(system) else f"Echo: {asked}"
    for seq in body.get("stop_sequences") or []:
        if seq in text:
            return [{"type": "text", "text": text.split(seq, 1)[0]}], "stop_sequence", seq
    words = text.split(" ")
    if len(words) > body["max_tokens"]:
        return [{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens", None
    return [{"type": "text", "text": text}], "end_turn", None


def _usage(body: dict[str, Any], blocks: list[Block]) -> dict[str, int]:
    prompt = len(json.dumps(body["messages"]) + str(body.get("system", ""))) // 4 + 1
    output = len(json.dumps(blocks)) // 4 + 1
    cached = body["model"].startswith("cached-")
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "cache_creation_input_tokens": 5 if cached else 0,
        "cache_read_input_tokens": 10 if cached else 0,
    }


def _message(body: dict[str, Any], blocks: list[Block], stop: str | None, seq: str | None) -> Any:
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": seq,
        "usage": _usage(body, blocks),
    }


async def _messages(state: FakeState, request: web.Request) -> web.StreamResponse:
    body = await remember(state, request)
    key = request.headers.get("x-api-key")
    if not key:
        return _error(401, "x-api-key header is required")
    if key.startswith("bad"):
        return _error(401, f"invalid x-api-key: {key}")
    if not request.headers.get("anthropic-version"):
        return _error(400, "anthropic-version: header is required")
    if complaint := _invalid(body):
        return _error(400, complaint)
    kind, value = fault_of(body["model"])
    if kind == "fail":
        return _error(value, f"fake failure {value}")
    if kind == "slow":
        await asyncio.sleep(value / 1000)
    blocks, stop, seq = _answer(body)
    if body.get("stream"):
        mode = "overloaded" if body["model"] == "overloaded-mid" else kind
        return await _stream(state, request, body, (blocks, stop, seq), mode, value)
    return web.json_response(_message(body, blocks, stop, seq))


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _block_events(index: int, block: Block, drip: bool) -> list[dict[str, Any]]:
    """content_block_start, its deltas, and content_block_stop for one answer block."""
    if block["type"] == "tool_use":
        start = {**block, "input": {}}
        args = json.dumps(block["input"])
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in ("", args[:4], args[4:])]
    else:
        start = {"type": "text", "text": ""}
        words = block["text"].split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        if drip:
            pieces = [f"tick{i} " for i in range(2000)]
        deltas = [{"type": "text_delta", "text": p} for p in pieces if p]
    return [
        {"type": "content_block_start", "index": index, "content_block": start},
        *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
        {"type": "content_block_stop", "index": index},
    ]


def _events(body: dict[str, Any], answer: Any, drip: bool) -> list[dict[str, Any]]:
    blocks, stop, seq = answer
    usage = _usage(body, blocks)
    start = _message(body, [], None, None)
    start["usage"] = {**usage, "output_tokens": 1}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(blocks):
        events += _block_events(index, block, drip)
    events.insert(2, {"type": "ping"})  # where Anthropic sends it: after the first block starts
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": seq},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
    )
    events.append({"type": "message_stop"})
    return events


async def _stream(
    state: FakeState,
    request: web.Request,
    body: dict[str, Any],
    answer: Any,
    kind: str,
    value: int,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    await resp.prepare(request)
    state.open_streams += 1
    deltas = 0
    try:
        for event in _events(body, answer, drip=kind == "drip"):
            if event["type"] == "content_block_delta":
                if kind == "cut" and deltas == value:
                    request.transport.close()  # type: ignore[union-attr]
                    return resp
                if kind == "malformed" and deltas == 1:
                    await resp.write(b"event: content_block_delta\ndata: {not json\n\n")
                if kind == "overloaded" and deltas == 2:
                    error = {"type": "overloaded_error", "message": "Overloaded"}
                    await resp.write(_sse({"type": "error", "error": error}))
                    await resp.write_eof()
                    return resp
                deltas += 1
                if kind == "drip":
                    await asyncio.sleep(value / 1000)
            await resp.write(_sse(event))
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        state.disconnects.append(time.monotonic())
        raise
    finally:
        state.closed_streams += 1
    return resp


def make_app(state: FakeState) -> web.Application:
    app = web.Application()

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _messages(state, request)

    async def not_found(request: web.Request) -> web.Response:
        await remember(state, request)
        return _error(404, f"Not found: {request.method} {request.path}")

    app.router.add_post("/v1/messages", messages)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def anthropic_fake() -> FakeServer:
    return FakeServer(make_app)
