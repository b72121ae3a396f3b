"""A fake Google Gemini API: generateContent, streamGenerateContent (SSE) and
batchEmbedContents, in Google's real wire format, with the shared fault modes.

The model name comes from the URL path (`/v1beta/models/{model}:{method}`), so the
fault modes of `tests.fakes.server` apply as for the other fakes. Like Google, the fake
rejects what the real API rejects (unknown fields, empty parts, JSON-Schema keywords
outside its OpenAPI subset), so a translation bug fails here rather than in production.
It also insists on the key arriving in `x-goog-api-key` and never in the URL.

Extra behaviours by model name:
  blocked   the prompt is refused: `promptFeedback.blockReason`, no candidates
  safety    the answer is stopped with finishReason SAFETY and no content
  think-*   usage reports `thoughtsTokenCount`
  unfinished  the stream ends cleanly but no event carries a finishReason
A `maxOutputTokens` below the answer's word count truncates it with MAX_TOKENS.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, FakeState, fault_of, remember

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_REQUEST_FIELDS = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
}
_GENERATION_FIELDS = {
    "temperature",
    "topP",
    "topK",
    "maxOutputTokens",
    "stopSequences",
    "seed",
    "candidateCount",
    "presencePenalty",
    "frequencyPenalty",
    "responseMimeType",
    "responseSchema",
    "thinkingConfig",
}
_PART_KINDS = {"text", "inlineData", "fileData", "functionCall", "functionResponse"}
_NOT_OPENAPI = {"additionalProperties", "$schema", "strict"}


class BadRequest(Exception):
    """What Google would answer with 400 INVALID_ARGUMENT."""


def error(status: int, message: str, details: list[Any] | None = None) -> web.Response:
    body: dict[str, Any] = {
        "error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    }
    if details:
        body["error"]["details"] = details
    headers = {"retry-after": "2"} if status == 429 else {}
    return web.json_response(body, status=status, headers=headers)


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in _NOT_OPENAPI:
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{key}" at {where}')
        if key == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                _check_schema(sub, f"{where}.properties[{name}]")
        elif key in ("items", "anyOf"):
            for sub in value if isinstance(value, list) else [value]:
                _check_schema(sub, f"{where}.{key}")


def _check_request(body: Any) -> None:
    if not isinstance(body, dict):
        raise BadRequest("Invalid JSON payload received.")
    if unknown := set(body) - _REQUEST_FIELDS:
        raise BadRequest(f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}"')
    if unknown := set(body.get("generationConfig", {})) - _GENERATION_FIELDS:
        raise BadRequest(f'Unknown name "{sorted(unknown)[0]}" at generation_config')
    if not body.get("contents"):
        raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(body["contents"]):
        if content.get("role") not in ("user", "model"):
            raise BadRequest(f"Please use a valid role: user, model. (contents[{i}])")
        if not content.get("parts"):
            raise BadRequest(f"* GenerateContentRequest.contents[{i}].parts: must not be empty")
        for part in content["parts"]:
            if len(set(part) & _PART_KINDS) != 1 or part.get("text") == "":
                raise BadRequest(f"Unable to submit request: invalid part in contents[{i}]")
    for tool in body.get("tools", []):
        for decl in tool.get("functionDeclarations", []):
            _check_schema(decl.get("parameters"), f"function_declarations[{decl['name']}]")
    _check_schema(body.get("generationConfig", {}).get("responseSchema"), "response_schema")


def _texts(parts: list[dict[str, Any]]) -> str:
    return " ".join(p["text"] for p in parts if "text" in p)


def function_calls(body: dict[str, Any]) -> list[dict[str, Any]]:
    declared = [d for t in body.get("tools", []) for d in t.get("functionDeclarations", [])]
    config = body.get("toolConfig", {}).get("functionCallingConfig", {})
    last = body["contents"][-1]["parts"]
    if not declared or config.get("mode") == "NONE" or any("functionResponse" in p for p in last):
        return []
    allowed = config.get("allowedFunctionNames")
    chosen = [d for d in declared if not allowed or d["name"] in allowed]
    return [{"name": d["name"], "args": {"q": i}} for i, d in enumerate(chosen)]


def answer_text(body: dict[str, Any]) -> str:
    config = body.get("generationConfig", {})
    last = body["contents"][-1]["parts"]
    said = _texts(last) or "; ".join(
        f"{p['functionResponse']['name']} -> {json.dumps(p['functionResponse']['response'])}"
        for p in last
        if "functionResponse" in p
    )
    if config.get("responseMimeType") == "application/json":
        props = (config.get("responseSchema") or {}).get("properties")
        if props:
            return json.dumps(
                {k: "x" if v.get("type") == "string" else 1 for k, v in props.items()}
            )
        return json.dumps({"answer": said})
    return f"Echo: {said}"


def _usage(body: dict[str, Any], model: str, text: str, calls: int) -> dict[str, int]:
    sent = sum(len(json.dumps(c)) for c in body["contents"]) // 4 + 1
    done = len(text) // 4 + 1 + 5 * calls
    out = {"promptTokenCount": sent, "candidatesTokenCount": done, "totalTokenCount": sent + done}
    if model.startswith("think-"):
        out["thoughtsTokenCount"] = 7
        out["totalTokenCount"] += 7
    return out


def _candidate(parts: list[dict[str, Any]], finish: str | None, index: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index}
    if parts:
        out["content"] = {"role": "model", "parts": parts}
    if finish:
        out["finishReason"] = finish
    return out


def _plan(body: dict[str, Any], model: str) -> tuple[str, list[dict[str, Any]], str]:
    """The answer's text, function calls and finish reason."""
    if model == "safety":
        return "", [], "SAFETY"
    calls = function_calls(body)
    text = "" if calls else answer_text(body)
    limit = body.get("generationConfig", {}).get("maxOutputTokens")
    if limit and len(text.split(" ")) > limit:
        return " ".join(text.split(" ")[:limit]), calls, "MAX_TOKENS"
    return text, calls, "STOP"


async def _generate(
    state: FakeState, request: web.Request, body: dict[str, Any], model: str, stream: bool
) -> web.StreamResponse:
    kind, value = fault_of(model)
    if kind == "slow":
        await asyncio.sleep(value / 1000)
    text, calls, finish = _plan(body, model)
    usage = _usage(body, model, text, len(calls))
    version = f"{model}-fake-001"
    if stream:
        return await _stream(state, request, body, model, (text, calls, finish), usage)
    if model == "blocked":
        return web.json_response(
            {
                "promptFeedback": {"blockReason": "SAFETY"},
                "usageMetadata": usage,
                "modelVersion": version,
            }
        )
    parts = ([{"text": text}] if text else []) + [{"functionCall": c} for c in calls]
    count = body.get("generationConfig", {}).get("candidateCount", 1)
    candidates = [_candidate(parts, finish, i) for i in range(count)]
    return web.json_response(
        {"candidates": candidates, "usageMetadata": usage, "modelVersion": version}
    )


def _event(data: dict[str, Any]) -> bytes:
    # Google separates its events with CRLF pairs.
    return b"data: " + json.dumps(data).encode() + b"\r\n\r\n"


def _stream_events(
    model: str, plan: tuple[str, list[dict[str, Any]], str], usage: dict[str, int]
) -> list[dict[str, Any]]:
    text, calls, finish = plan
    version = f"{model}-fake-001"
    running = {"promptTokenCount": usage["promptTokenCount"]}
    if model == "blocked":
        return [{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage}]
    if model.startswith("drip-"):
        pieces: list[list[dict[str, Any]]] = [[{"text": f"tick{i} "}] for i in range(2000)]
    else:
        words = text.split(" ") if text else []
        pieces = [[{"text": w + (" " if i < len(words) - 1 else "")}] for i, w in enumerate(words)]
    if calls:
        # Like Google, parallel calls arrive whole, together in one event.
        pieces.append([{"functionCall": c} for c in calls])
    events: list[dict[str, Any]] = [
        {"candidates": [_candidate(p, None)], "usageMetadata": running, "modelVersion": version}
        for p in pieces or [[]]
    ]
    # The last event carries the finish reason and the final usage; then the stream ends.
    if model != "unfinished":
        events[-1]["candidates"][0]["finishReason"] = finish
    events[-1]["usageMetadata"] = usage
    return events


async def _stream(
    state: FakeState,
    request: web.Request,
    body: dict[str, Any],
    model: str,
    plan: tuple[str, list[dict[str, Any]], str],
    usage: dict[str, int],
) -> web.StreamResponse:
    kind, value = fault_of(model)
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    state.open_streams += 1
    try:
        for n, event in enumerate(_stream_events(model, plan, usage)):
            if kind == "cut" and n >= value:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if kind == "malformed" and n == 1:
                await resp.write(b"data: {not json\r\n\r\n")
            await resp.write(_event(event))
            if kind == "drip":
                await asyncio.sleep(value / 1000)
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        state.disconnects.append(time.monotonic())
        raise
    finally:
        state.closed_streams += 1
    return resp


def _embed(body: dict[str, Any], model: str) -> web.Response:
    embeddings = []
    for i, item in enumerate(body.get("requests") or []):
        # Google checks that every request names the model of the URL.
        if item.get("model") != f"models/{model}":
            raise BadRequest(f"requests[{i}].model must be models/{model}")
        if not _texts(item.get("content", {}).get("parts", [])):
            raise BadRequest(f"requests[{i}].content: must not be empty")
        dims = item.get("outputDimensionality") or 8
        embeddings.append({"values": [round(0.1 * (i + 1), 3)] + [0.25] * (dims - 1)})
    if not embeddings:
        raise BadRequest("* BatchEmbedContentsRequest.requests: must not be empty")
    return web.json_response({"embeddings": embeddings})


async def _handle(state: FakeState, request: web.Request) -> web.StreamResponse:
    body = await remember(state, request)
    model, _, method = request.match_info["target"].rpartition(":")
    if "key" in request.query:
        return error(400, "API keys must not be sent in the URL (fake's rule)")
    key = request.headers.get("x-goog-api-key", "")
    if not key:
        return error(
            403,
            "Method doesn't allow unregistered callers (callers without "
            "established identity). Please use API Key or other form of API "
            "consumer identity to call this API.",
        )
    if key == "bad-key":
        return error(
            400,
            "API key not valid. Please pass a valid API key.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        )
    kind, value = fault_of(model)
    if kind == "fail":
        # Echoes the key, so tests prove the adapter scrubs upstream messages.
        return error(value, f"fake failure {value} for key {key}")
    try:
        if method == "batchEmbedContents":
            if kind == "slow":
                await asyncio.sleep(value / 1000)
            return _embed(body, model)
        if method not in ("generateContent", "streamGenerateContent"):
            return error(404, f"Method {method} not found.")
        if method == "streamGenerateContent" and request.query.get("alt") != "sse":
            return error(400, "the fake only streams with alt=sse")
        _check_request(body)
        return await _generate(state, request, body, model, method == "streamGenerateContent")
    except BadRequest as e:
        return error(400, str(e))


def make_app(state: FakeState) -> web.Application:
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _handle(state, request)

    # `{target}` is `<model>:<method>`; aiohttp's default pattern admits the colon.
    app.router.add_post("/v1beta/models/{target}", handle)
    return app


def gemini_fake() -> FakeServer:
    return FakeServer(make_app)
