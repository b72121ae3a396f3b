"""Who a request belongs to, and the bodies kept for routes that store them (and for
LangSmith runs, when LangSmith is on).

A route with `bodies: {store: true}` has its request and response bodies added to the
request record; the recorder redacts them (PII and secrets) off the request path before
they leave the process, and the workers store them with their own retention. LangSmith's
thread masks its copy the same way, with the route's redactor.
"""

from __future__ import annotations

import logging
from typing import Any

from app.api.auth import Caller
from app.api.exchange import Exchange
from app.api.streaming import StreamSink
from app.cache.answer import StreamAssembler
from app.cycle.rules import Expectations
from app.state import AppState

DAY_S = 86400.0
log = logging.getLogger("flywheel.records")


def note_route(state: AppState, exchange: Exchange, caller: Caller, route: str, body: Any) -> None:
    """The exchange's caller and route (only one the routes file has: the model a client
    sent is not a route until resolved), and its bodies if the route stores them.
    Raises 403 when the caller's key may not use the route."""
    exchange.tenant = caller.tenant
    exchange.key_id = caller.key.id if caller.key is not None else None
    config = state.router.routes.get(route)
    if config is None:
        return
    caller.check_route(route)
    exchange.route = route
    # The SLO of the route the client asked for: a fallback serves that route's promise.
    exchange.expect = Expectations.of_body(body, config.cycle.latency_slo_ms)
    if config.bodies is not None and config.bodies.store:
        days = config.bodies.retention_days or state.settings.flywheel_body_retention_days
        exchange.keep_bodies(days * DAY_S, body)
    if state.langsmith is not None:
        exchange.trace_to(state.langsmith, state.redactors.of(route), body)


def keep_response(exchange: Exchange, answer: Any) -> None:
    """The answer, for the quality rules (by reference) and, when kept, for the record."""
    if isinstance(answer, dict):
        exchange.answer = answer
    if exchange.keeps_content:
        exchange.response_body = answer


def embeddings_summary(answer: Any) -> Any:
    """Vectors are bulky and say nothing to a reader: the stored response omits them."""
    if not isinstance(answer, dict):
        return answer
    return {k: v for k, v in answer.items() if k != "data"} | {
        "data_count": len(answer.get("data") or ())
    }


class BodySink:
    """Assembles a streamed answer for the record, passing every chunk on to `inner`."""

    __slots__ = ("_assembler", "_exchange", "_inner")

    def __init__(self, exchange: Exchange, inner: StreamSink | None) -> None:
        self._exchange = exchange
        self._inner = inner
        self._assembler: StreamAssembler | None = StreamAssembler()

    def feed(self, chunk: dict[str, Any]) -> None:
        if self._assembler is not None:
            try:
                self._assembler.feed(chunk)
            except Exception:  # keeping a body must never break a live stream
                log.exception("stream body not kept: assembling it failed")
                self._assembler = None
        if self._inner is not None:
            self._inner.feed(chunk)

    def close(self, complete: bool) -> None:
        if self._assembler is not None:
            try:
                self._exchange.response_body = self._assembler.result()
            except Exception:
                log.exception("stream body not kept: assembling it failed")
                self._exchange.response_body = None
        if self._inner is not None:
            self._inner.close(complete)


def stream_sink(exchange: Exchange, inner: StreamSink | None) -> StreamSink | None:
    return BodySink(exchange, inner) if exchange.keeps_content else inner
