"""The response cache on the request path: the policy, serving hits, filling misses.

Policy: the route's `cache:` section (or FLYWHEEL_CACHE_MODE/TTL_S), narrowed by the
request: `Cache-Control: no-cache` skips the read, `no-store` the write, and
`x-flywheel-cache-ttl` sets the TTL. Only complete, successful answers are stored. A
cached chat answer serves both JSON and streaming requests (a stream is replayed chunk
by chunk), whichever kind of request filled it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from app.api.bodies import embeddings_summary
from app.api.exchange import Exchange
from app.api.responses import EventStream, JSONBytes
from app.api.routing import seconds_header
from app.api.streaming import DONE, sse
from app.cache.answer import StreamAssembler, is_cacheable, replay_chunks
from app.cache.entry import Cached
from app.cache.keys import cache_key
from app.cache.service import Flight, Joined, ResponseCache
from app.state import AppState

TTL_HEADER = "x-flywheel-cache-ttl"
log = logging.getLogger("flywheel.cache")


@dataclass(frozen=True, slots=True)
class CachePlan:
    key: str
    route: str
    kind: str
    read: bool
    write: bool
    ttl_s: float
    store_truncated: bool
    choices: int  # how many choices a complete answer has (the request's `n`)


_LOOSE_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("stream", bool),
    ("stream_options", (dict, type(None))),
    ("user", str),
    ("metadata", (dict, type(None))),
)


def early_route(state: AppState, body: dict[str, Any]) -> str | None:
    """The route, when it is known from the raw body alone (no rules, not an ensemble)
    and the fields the cache key leaves out are well-typed: then an L1 hit can be
    served before validation (~6% of a hit's CPU in profiles). A cached answer was
    validated when it was filled, with the same key fields."""
    model = body.get("model")
    if not isinstance(model, str):
        return None
    config = state.router.routes.get(model)
    if config is None or config.rules or config.ensemble is not None:
        return None
    for name, kind in _LOOSE_FIELDS:
        if name in body and not isinstance(body[name], kind):
            return None
    return model


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def plan(
    state: AppState,
    kind: str,
    route: str,
    body: dict[str, Any],
    headers: Mapping[str, str],
    tenant: str,
    variant: str | None = None,
) -> CachePlan | None:
    """What the cache may do for this request (answers never cross `tenant`s, nor prompt
    variants: `variant` is the arm's fingerprint, see `app.api.variants`); None when it
    may do nothing."""
    settings = state.settings
    config = state.router.route(route).cache
    mode = config.mode if config is not None else settings.flywheel_cache_mode
    read, write = mode in ("on", "read_only"), mode in ("on", "write_only")
    if not (read or write) or body.get("logprobs"):
        # Replayed answers carry no logprobs: a request that wants them is never cached.
        return None
    control = headers.get("cache-control")
    if control:
        directives = {part.split("=")[0].strip().lower() for part in control.split(",")}
        read = read and "no-cache" not in directives
        write = write and "no-store" not in directives
    ttl = (config.ttl_s if config is not None else None) or settings.flywheel_cache_ttl_s
    raw_ttl = headers.get(TTL_HEADER)
    if raw_ttl is not None:
        ttl = seconds_header(raw_ttl, TTL_HEADER, settings.flywheel_cache_max_ttl_s)
    if not (read or write):
        return None
    key = cache_key(
        settings.flywheel_redis_prefix,
        kind,
        route,
        body,
        tenant=tenant,
        variant=variant,
    )
    truncated = config.store_truncated if config is not None else False
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return CachePlan(key, route, kind, read, write, ttl, truncated, choices)


async def look_up(
    state: AppState, p: CachePlan, exchange: Exchange, deadline: float, *, l1_checked: bool
) -> Joined:
    """The cached answer, or the flight this request leads; a miss is noted on `exchange`."""
    found = await state.cache.lookup(
        p.key,
        ttl_s=p.ttl_s,
        left_s=deadline - time.monotonic(),
        lead=p.write,
        l1_checked=l1_checked,
    )
    if found.cached is None:
        exchange.cache = "miss"
    return found


def fill(cache: ResponseCache, p: CachePlan, flight: Flight | None, answer: Any) -> None:
    """Store a finished answer if it deserves it; release the flight either way."""
    cached = None
    if p.write and isinstance(answer, dict):
        if is_cacheable(answer, allow_length=p.store_truncated):
            cached = Cached.of(p.kind, p.route, answer)
        else:
            cache.stats.not_stored += 1
    if flight is not None:
        flight.finish(cached, p.ttl_s)
    elif cached is not None:
        cache.put(p.key, cached, p.ttl_s)


class StreamFill:
    """Assembles a stream as it passes; stores it when it ended complete and clean."""

    __slots__ = ("_assembler", "_cache", "_flight", "_plan")

    def __init__(self, cache: ResponseCache, p: CachePlan, flight: Flight | None) -> None:
        self._cache = cache
        self._plan = p
        self._flight = flight
        self._assembler: StreamAssembler | None = StreamAssembler()

    def feed(self, chunk: dict[str, Any]) -> None:
        if self._assembler is None:
            return
        try:
            self._assembler.feed(chunk)
        except Exception:  # the cache must never break a live stream
            log.exception("stream not cacheable: assembling it failed")
            self._assembler = None

    def close(self, complete: bool) -> None:
        answer = None
        try:
            if complete and self._assembler is not None:
                answer = self._assembler.result()
            if answer is not None and len(answer.get("choices") or ()) != self._plan.choices:
                answer = None  # a choice never arrived: not the whole answer
        except Exception:
            log.exception("stream not cacheable: assembling it failed")
            answer = None
        if answer is None:
            if self._flight is not None:
                self._flight.finish()
            return
        fill(self._cache, self._plan, self._flight, answer)


def hit_response(
    cached: Cached, tier: str, exchange: Exchange, state: AppState, stream: bool, usage: bool
) -> Response:
    """Serve a cached answer as JSON, or replayed as a stream; recorded as a hit."""
    exchange.cache = tier
    exchange.stream = stream
    answer = cached.answer
    exchange.answer = answer  # the quality rules score a hit's answer too
    choices = answer.get("choices") or [{}]
    if exchange.keeps_content:
        exchange.response_body = answer if cached.kind == "chat" else embeddings_summary(answer)
    exchange.record(
        state.recorder,
        status=200,
        usage=answer.get("usage"),
        finish_reason=choices[0].get("finish_reason") if cached.kind == "chat" else None,
    )
    headers = exchange.headers()
    if not stream:
        return JSONBytes(cached.json_body(exchange.request_id), headers)
    chunks = replay_chunks(answer, request_id=exchange.request_id, include_usage=usage)
    return EventStream(_replay(chunks), headers)


async def _replay(chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield sse(chunk)
    yield DONE
