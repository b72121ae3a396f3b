"""POST /v1/embeddings."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api import cached
from app.api.admission import admit
from app.api.auth import Caller, authenticate
from app.api.bodies import embeddings_summary, keep_response, note_route
from app.api.body import BodyReader, openapi_body, read_json_object, request_body, validate
from app.api.calls import embed_call
from app.api.exchange import BatchTag, Exchange
from app.api.routing import request_deadline
from app.api.traced import traced_attempt
from app.cache.service import Flight
from app.deps import StateDep, request_id
from app.errors import GatewayError, InvalidRequestError
from app.providers.base import JSON
from app.routing.router import Target
from app.schemas.embeddings import EMBEDDING_REQUEST
from app.state import AppState

router = APIRouter()

PATH = "/v1/embeddings"


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
    exchange = Exchange(rid, "embeddings", span=tracing.current_span(), batch=batch)
    cache_plan: cached.CachePlan | None = None
    flight: Flight | None = None
    result: JSON | None = None
    try:
        if caller is None:
            with tracing.span("auth"):
                caller = await authenticate(state, headers)
        length = headers.get("content-length")
        body = await read_json_object(read, length, state.settings.flywheel_max_body_bytes)
        req = validate(EMBEDDING_REQUEST, body)
        if not req.texts or any(t == "" for t in req.texts):
            raise InvalidRequestError(
                "input must not be empty", param="input", code="invalid_value"
            )
        deadline, client_set = request_deadline(state, req.model, headers)
        note_route(state, exchange, caller, req.model, body)
        with tracing.span("limits"):
            await admit(state, exchange, caller, req.model, body)
        cache_plan = cached.plan(state, "embeddings", req.model, body, headers, caller.tenant)
        if cache_plan is not None and cache_plan.read:
            with tracing.span("cache.lookup", {"flywheel.route": req.model}):
                found = await cached.look_up(
                    state, cache_plan, exchange, deadline, l1_checked=False
                )
            if found.cached is not None and found.tier is not None:
                return cached.hit_response(found.cached, found.tier, exchange, state, False, False)
            flight = found.flight

        def attempt(target: Target) -> Awaitable[JSON]:
            exchange.target = target
            call = embed_call(target, req, body, rid)
            return state.providers.get(target.deployment.provider).embed(call)

        sent = time.perf_counter()
        with tracing.span("route", {"flywheel.route": req.model}):
            won = await state.dispatcher.run(
                req.model,
                traced_attempt(tracing, exchange, attempt),
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
    finally:
        if flight is not None and result is None:
            flight.finish()  # failed or cancelled: its waiters proceed on their own
    if cache_plan is not None:
        cached.fill(state.cache, cache_plan, flight, result)
    keep_response(exchange, embeddings_summary(result))
    exchange.record(state.recorder, status=200, usage=result.get("usage"))
    return Response(orjson.dumps(result), media_type="application/json", headers=exchange.headers())


@router.post(PATH, openapi_extra=openapi_body("EmbeddingRequest"), tags=["openai"])
async def embeddings(request: Request, state: StateDep) -> Response:
    return await handle(state, request_id(request), request_body(request), request.headers)
