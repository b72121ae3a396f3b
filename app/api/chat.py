"""POST /v1/chat/completions: glue between the wire, the router and the providers.

`handle` is the whole exchange; the fast path (`app.api.fastpath`) calls it straight
from ASGI, and the FastAPI route below calls the same function for the docs and for
any server that bypasses the fast path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app.api.body import openapi_body, read_json_object, validate
from app.api.exchange import Exchange
from app.api.streaming import first_chunk, sse_body
from app.deps import StateDep, request_id
from app.errors import GatewayError
from app.providers.base import ChatCall, Provider
from app.schemas.chat import CHAT_REQUEST, ChatCompletionRequest
from app.state import AppState
from app.store.records import Recorder

router = APIRouter()

PATH = "/v1/chat/completions"


async def handle(
    state: AppState, rid: str, source: AsyncIterator[bytes], length: str | None
) -> Response:
    exchange = Exchange(rid, "chat.completions")
    try:
        body = await read_json_object(source, length, state.settings.flywheel_max_body_bytes)
        chat = validate(CHAT_REQUEST, body)
        exchange.stream = bool(chat.stream)
        exchange.target = target = state.router.pick(chat.model)
        call = ChatCall(
            request=chat,
            body=body,
            deployment=target.deployment,
            api_key=target.api_key,
            timeout_s=target.timeout_s,
            request_id=rid,
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
    except asyncio.CancelledError:
        # The client went away before the answer (the fast path cancels us): the
        # upstream call has been cancelled with us; what it cost is unknown but noted.
        exchange.record(state.recorder, status=499, disconnected=True)
        raise
    result["id"] = rid
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


@router.post(PATH, openapi_extra=openapi_body("ChatCompletionRequest"), tags=["openai"])
async def chat_completions(request: Request, state: StateDep) -> Response:
    length = request.headers.get("content-length")
    return await handle(state, request_id(request), request.stream(), length)
