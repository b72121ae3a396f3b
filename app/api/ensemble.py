"""Ensemble routes: fan a request out to member routes in parallel and merge the answers.

Each member goes through the dispatcher (so retries, breakers and fallbacks apply per
member); a failing member never fails the request while another succeeds. The response
says how the fan-out went: members, successes, and slowest minus mean duration.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi.responses import Response

from app.api.calls import chat_call
from app.api.exchange import Exchange
from app.errors import GatewayError, InvalidRequestError, UpstreamError
from app.routing.ensemble import Member, merge
from app.routing.router import Target
from app.schemas.chat import ChatCompletionRequest
from app.state import AppState


async def run_ensemble(
    state: AppState,
    route: str,
    chat: ChatCompletionRequest,
    body: dict[str, Any],
    exchange: Exchange,
    deadline: float,
    client_deadline: bool,
) -> Response:
    config = state.router.route(route).ensemble
    assert config is not None
    if chat.stream:
        raise InvalidRequestError(
            f"route {route!r} is an ensemble, which answers only non-streaming requests",
            param="stream",
            code="unsupported_value",
        )

    async def member(name: str) -> Member:
        def call(target: Target) -> Any:
            request = chat_call(target, chat, body, exchange.request_id)
            return state.providers.get(target.deployment.provider).complete(request)

        started = time.perf_counter()
        won = await state.dispatcher.run(
            name, call, deadline=deadline, count=exchange.count, client_deadline=client_deadline
        )
        won.lease.succeeded()
        return Member(name, won.value, time.perf_counter() - started)

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(member(name)) for name in config.members]
    done: list[Member] = []
    errors: list[GatewayError] = []
    try:
        for next_done in asyncio.as_completed(tasks, timeout=max(0.0, deadline - time.monotonic())):
            try:
                done.append(await next_done)
            except GatewayError as e:
                errors.append(e)
                continue
            if config.strategy == "first_success":
                break
    except TimeoutError:
        pass  # members still running are cancelled below; the finished ones count
    finally:
        for task in tasks:
            task.cancel()
    exchange.upstream_s = time.perf_counter() - started
    if not done:
        raise errors[0] if errors else UpstreamError("no ensemble member answered in time")
    result = merge(config.strategy, chat, done)
    result["id"] = exchange.request_id
    result["model"] = route
    durations = [m.seconds for m in done]
    headers = exchange.headers()
    headers["x-flywheel-route"] = route
    headers["x-flywheel-ensemble-members"] = str(len(config.members))
    headers["x-flywheel-ensemble-successes"] = str(len(done))
    spread = (max(durations) - sum(durations) / len(durations)) * 1000
    headers["x-flywheel-ensemble-spread-ms"] = f"{spread:.1f}"
    exchange.answer = result  # scored by the quality rules, as any answer
    exchange.record(state.recorder, status=200, usage=result.get("usage"), finish_reason="stop")
    return Response(orjson.dumps(result), media_type="application/json", headers=headers)
