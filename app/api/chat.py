"""POST /v1/chat/completions: glue between the wire, the router and the providers.

`handle` is the whole exchange; the fast path (`app.api.fastpath`) calls it straight
from ASGI, and the FastAPI route below calls the same function for the docs and for
any server that bypasses the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api import cached, variants
from app.api.admission import admit
from app.api.auth import Caller, authenticate
from app.api.bodies import keep_response, note_route, stream_sink
from app.api.body import BodyReader, openapi_body, read_json_object, request_body, validate
from app.api.calls import chat_call
from app.api.ensemble import run_ensemble
from app.api.exchange import BatchTag, Exchange
from app.api.responses import EventStream, JSONBytes
from app.api.routing import request_deadline, resolve_route
from app.api.streaming import StreamSink, first_chunk, sse_body
from app.api.traced import traced_attempt
from app.cache.service import Flight
from app.cycle.variants import apply as apply_variant
from app.deps import StateDep, request_id
from app.errors import GatewayError
from app.observability.tracing import set_attributes
from app.providers.base import JSON, ChatCall
from app.routing.router import Target
from app.schemas.chat import CHAT_REQUEST, ChatCompletionRequest
from app.state import AppState

router = APIRouter()

PATH = "/v1/chat/completions"


async def handle(
    state: AppState,
    rid: str,
    read: BodyReader,
    headers: Mapping[str, str],
    *,
    caller: Caller | None = None,
    batch: BatchTag | None = None,
) -> Response:
    """`caller` is given for a batch's line (its owner, already known to the worker that
    runs `batch`); a client's request is authenticated from its headers."""
    tracing = state.tracing
    exchange = Exchange(rid, "chat.completions", span=tracing.current_span(), batch=batch)
    cache_plan: cached.CachePlan | None = None
    flight: Flight | None = None
    result: JSON | None = None
    try:
        if caller is None:
            with tracing.span("auth"):
                caller = await authenticate(state, headers)
        length = headers.get("content-length")
        raw = await read_json_object(read, length, state.settings.flywheel_max_body_bytes)
        # `raw` is the client's body, `body` the one sent upstream (with the route's
        # prompt variant, if it has a plan); the cache keys `raw` and the arm.
        body = raw
        early = cached.early_route(state, raw)
        arm = None if early is None else variants.pick(state, exchange, early, raw)
        if early is not None:
            body = raw if arm is None else apply_variant(arm, raw)
            note_route(state, exchange, caller, early, body)
            with tracing.span("limits"):
                await admit(state, exchange, caller, early, body)
            key = None if arm is None else arm.fingerprint
            cache_plan = cached.plan(state, "chat", early, raw, headers, caller.tenant, key)
            if cache_plan is not None and cache_plan.read:
                hit = state.cache.get_l1(cache_plan.key)
                if hit is not None:
                    stream, usage = raw.get("stream") is True, cached.wants_usage(raw)
                    return cached.hit_response(hit, "hit-l1", exchange, state, stream, usage)
        chat = validate(CHAT_REQUEST, raw)
        exchange.stream = bool(chat.stream)
        route = resolve_route(state, chat, headers)
        if early is None:
            arm = variants.pick(state, exchange, route, raw)
            body = raw if arm is None else apply_variant(arm, raw)
        if arm is not None and body is not raw:
            chat = variants.sent_request(arm, body, chat)
        note_route(state, exchange, caller, route, body)
        with tracing.span("limits"):
            await admit(state, exchange, caller, route, body)
        deadline, client_set = request_deadline(state, route, headers)
        if state.router.route(route).ensemble is not None:
            return await run_ensemble(state, route, chat, body, exchange, deadline, client_set)
        if early is None:
            key = None if arm is None else arm.fingerprint
            cache_plan = cached.plan(state, "chat", route, raw, headers, caller.tenant, key)
        if cache_plan is not None and cache_plan.read:
            with tracing.span("cache.lookup", {"flywheel.route": route}) as span:
                found = await cached.look_up(
                    state, cache_plan, exchange, deadline, l1_checked=early is not None
                )
                set_attributes(span, {"flywheel.cache": found.tier or "miss"})
            if found.cached is not None and found.tier is not None:
                usage = chat.wants_usage_in_stream
                return cached.hit_response(
                    found.cached, found.tier, exchange, state, bool(chat.stream), usage
                )
            flight = found.flight
        provider_of = state.providers.get

        def call(target: Target) -> ChatCall:
            exchange.target = target
            return chat_call(target, chat, body, rid)

        if chat.stream:
            fill = stream_sink(
                exchange,
                None if cache_plan is None else cached.StreamFill(state.cache, cache_plan, flight),
            )
            flight = None  # the stream releases it when it ends
            return await _stream(state, route, call, chat, exchange, deadline, client_set, fill)

        def complete(t: Target) -> Awaitable[JSON]:
            return provider_of(t.deployment.provider).complete(call(t))

        sent = time.perf_counter()
        with tracing.span("route", {"flywheel.route": route}):
            won = await state.dispatcher.run(
                route,
                traced_attempt(tracing, exchange, complete),
                deadline=deadline,
                count=exchange.count,
                client_deadline=client_set,
                yield_to=exchange.yield_to,
            )
        won.lease.succeeded()
        exchange.upstream_s = time.perf_counter() - sent
        exchange.target = won.target
        result = won.value
    except GatewayError as e:
        exchange.record(state.recorder, status=e.status, error_code=e.code, error_type=e.type)
        e.headers.update(exchange.headers())
        raise
    except asyncio.CancelledError:
        # The client went away before the answer (the fast path cancels us): the
        # upstream call has been cancelled with us; what it cost is unknown but noted.
        exchange.record(state.recorder, status=499, disconnected=True)
        raise
    finally:
        if flight is not None and result is None:
            flight.finish()  # failed or cancelled: its waiters proceed on their own
    result["id"] = rid
    if cache_plan is not None:
        cached.fill(state.cache, cache_plan, flight, result)
    choices = result.get("choices") or [{}]
    keep_response(exchange, result)
    exchange.record(
        state.recorder,
        status=200,
        usage=result.get("usage"),
        finish_reason=choices[0].get("finish_reason"),
    )
    return JSONBytes(orjson.dumps(result), exchange.headers())


async def _stream(
    state: AppState,
    route: str,
    call: Callable[[Target], ChatCall],
    chat: ChatCompletionRequest,
    exchange: Exchange,
    deadline: float,
    client_set: bool,
    fill: StreamSink | None,
) -> Response:
    async def attempt(target: Target) -> tuple[JSON, AsyncIterator[JSON]]:
        upstream = state.providers.get(target.deployment.provider).stream(call(target))
        return await first_chunk(upstream), upstream

    async def discard(pair: tuple[JSON, AsyncIterator[JSON]]) -> None:
        await pair[1].aclose()  # type: ignore[attr-defined]

    sent = time.perf_counter()
    try:
        with state.tracing.span("route", {"flywheel.route": route}):
            won = await state.dispatcher.run(
                route,
                traced_attempt(state.tracing, exchange, attempt),
                deadline=deadline,
                count=exchange.count,
                discard=discard,
                client_deadline=client_set,
                yield_to=exchange.yield_to,
            )
    except BaseException:
        if fill is not None:
            fill.close(complete=False)
        raise
    exchange.target = won.target
    exchange.upstream_s = time.perf_counter() - sent
    exchange.ttft_s = time.perf_counter() - exchange.started
    first, upstream = won.value
    body = sse_body(
        first,
        upstream,
        request=chat,
        exchange=exchange,
        recorder=state.recorder,
        lease=won.lease,
        fill=fill,
        tracing=state.tracing,
    )

    async def abandon() -> None:
        # The client left before the response started: the body will never run, so
        # what its `finally` would do happens here.
        if fill is not None:
            fill.close(complete=False)
        won.lease.abandoned()
        exchange.record(state.recorder, status=499, disconnected=True)
        with contextlib.suppress(Exception):
            await upstream.aclose()  # type: ignore[attr-defined]

    return EventStream(body, exchange.headers(), abandon)


@router.post(
    PATH, openapi_extra=openapi_body("ChatCompletionRequest", stream=True), tags=["openai"]
)
async def chat_completions(request: Request, state: StateDep) -> Response:
    return await handle(state, request_id(request), request_body(request), request.headers)
