"""POST /v1/chat/completions: glue between the wire, the router and the providers."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app.api.body import read_json_object, validate
from app.api.exchange import Exchange
from app.api.streaming import first_chunk, sse_body
from app.deps import StateDep, request_id
from app.errors import GatewayError
from app.providers.base import ChatCall, Provider
from app.schemas.chat import CHAT_REQUEST, ChatCompletionRequest
from app.store.records import Recorder

router = APIRouter()

_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}
        },
    }
}


@router.post("/v1/chat/completions", openapi_extra=_OPENAPI_BODY, tags=["openai"])
async def chat_completions(request: Request, state: StateDep) -> Response:
    exchange = Exchange(request_id(request), "chat.completions")
    try:
        body = await read_json_object(request, state.settings.flywheel_max_body_bytes)
        chat = validate(CHAT_REQUEST, body)
        exchange.stream = bool(chat.stream)
        exchange.target = target = state.router.pick(chat.model)
        call = ChatCall(
            request=chat,
            body=body,
            deployment=target.deployment,
            api_key=target.api_key,
            timeout_s=target.timeout_s,
            request_id=exchange.request_id,
        )
        provider = state.providers.get(target.deployment.provider)
        exchange.attempts = 1
        if chat.stream:
            return await _stream(call, chat, exchange, state.recorder, provider)
        sent = time.perf_counter()
        result = await provider.complete(call)
        exchange.upstream_s = time.perf_counter() - sent
    except GatewayError as e:
        exchange.record(state.recorder, status=e.status, error_code=e.code)
        e.headers.update(exchange.headers())
        raise
    result["id"] = exchange.request_id
    choices = result.get("choices") or [{}]
    exchange.record(
        state.recorder,
        status=200,
        usage=result.get("usage"),
        finish_reason=choices[0].get("finish_reason"),
    )
    return Response(orjson.dumps(result), media_type="application/json", headers=exchange.headers())


async def _stream(
    call: ChatCall,
    chat: ChatCompletionRequest,
    exchange: Exchange,
    recorder: Recorder,
    provider: Provider,
) -> Response:
    sent = time.perf_counter()
    upstream = provider.stream(call)
    first = await first_chunk(upstream)
    exchange.upstream_s = time.perf_counter() - sent
    exchange.ttft_s = time.perf_counter() - exchange.started
    headers = exchange.headers()
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"  # proxies in front must not buffer the stream
    return StreamingResponse(
        sse_body(first, upstream, request=chat, exchange=exchange, recorder=recorder),
        media_type="text/event-stream",
        headers=headers,
    )
