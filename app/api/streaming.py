"""Server-sent events to the client, with accounting that survives a disconnect.

The first upstream chunk is awaited before the response starts, so a failure before the
first byte is still an ordinary JSON error with its real status. After that, a failure
becomes an SSE error event followed by `[DONE]`. A client disconnect cancels this
generator (Starlette listens for it), which cancels the upstream read and closes its
connection; the `finally` block records the usage seen or estimated so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from opentelemetry.trace import Span

from app.api.exchange import Exchange
from app.cycle.gather import AnswerGatherer
from app.errors import GatewayError, UpstreamError
from app.observability.tracing import NO_SPAN, Tracing, mark_error, set_attributes
from app.providers.mock import estimate_tokens, prompt_tokens
from app.routing.dispatch import Lease
from app.routing.failures import Failure
from app.schemas.chat import ChatCompletionRequest
from app.store.records import Recorder

log = logging.getLogger("flywheel.stream")

DONE = b"data: [DONE]\n\n"


class StreamSink(Protocol):
    """Sees every chunk sent, then how the stream ended (the cache's fill)."""

    def feed(self, chunk: dict[str, Any]) -> None: ...

    def close(self, complete: bool) -> None: ...


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def first_chunk(upstream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await anext(upstream)
    except StopAsyncIteration:
        raise UpstreamError("upstream closed the stream without sending anything") from None


class _Tally:
    """What the stream carried, for the record: what the quality rules read and its
    size, for when the upstream sends no usage (`gathered`), and how it finished."""

    __slots__ = ("finish", "gathered", "usage")

    def __init__(self, gathered: AnswerGatherer) -> None:
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.gathered = gathered

    def see(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            finish = choice.get("finish_reason")
            if finish:
                self.finish = finish
            self.gathered.feed(choice.get("index", 0), choice.get("delta") or {}, finish)


async def sse_body(
    first: dict[str, Any],
    upstream: AsyncIterator[dict[str, Any]],
    *,
    request: ChatCompletionRequest,
    exchange: Exchange,
    recorder: Recorder,
    lease: Lease,
    fill: StreamSink | None = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[bytes]:
    span = NO_SPAN if tracing is None else tracing.open_span("stream", exchange.span)
    chunks = 0
    tally = _Tally(AnswerGatherer(whole_text=exchange.wants_whole_text))
    wants_usage = request.wants_usage_in_stream
    status, error_code, complete, disconnected = 200, None, False, False
    error_type: str | None = None
    chunk: dict[str, Any] | None = first
    try:
        while chunk is not None:
            tally.see(chunk)
            if fill is not None:
                fill.feed(chunk)  # before the usage the client did not ask for goes
            chunk["id"] = exchange.request_id
            if not wants_usage and "usage" in chunk:
                # The gateway asked the upstream for usage; the client did not.
                del chunk["usage"]
                if not chunk.get("choices"):
                    chunk = await anext(upstream, None)
                    continue
            yield sse(chunk)
            chunks += 1
            chunk = await anext(upstream, None)
        complete = True
        yield DONE
    except GatewayError as e:
        status, error_code, error_type = e.status, e.code, e.type
        yield sse(e.body())
        yield DONE
    except Exception:
        # A bug must still end the stream the way clients expect: an error event, [DONE].
        log.exception("stream %s failed", exchange.request_id)
        err = UpstreamError("the stream failed inside the gateway", code="internal_error")
        status, error_code, error_type = 500, err.code, err.type
        yield sse(err.body())
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        disconnected = True
        raise
    finally:
        if fill is not None:
            fill.close(complete=complete)
        if complete:
            lease.succeeded(ttfb_s=exchange.ttft_s)
        elif disconnected:
            lease.abandoned()
        else:
            lease.failed(Failure.UPSTREAM)
        if disconnected and not complete:
            status = 499  # the client left: what the record and the span say
        usage = tally.usage
        estimated = usage is None
        if usage is None:
            completion = estimate_tokens("x" * tally.gathered.chars)
            usage = {"prompt_tokens": prompt_tokens(request), "completion_tokens": completion}
        if status < 400:
            exchange.answer = tally.gathered.answer()  # what the quality rules score
        exchange.record(
            recorder,
            status=status,
            usage=usage,
            finish_reason=tally.finish,
            error_code=error_code,
            error_type=error_type,
            disconnected=disconnected,
            usage_estimated=estimated,
        )
        if span.is_recording():
            _end_span(span, chunks, complete, disconnected, tally.finish, status, error_type)
        if not complete:
            # Normally the upstream generator is already finished by the exception that
            # ended us; if we were closed between chunks, close it so its connection goes.
            with contextlib.suppress(BaseException):
                await upstream.aclose()  # type: ignore[attr-defined]


def _end_span(
    span: Span,
    chunks: int,
    complete: bool,
    disconnected: bool,
    finish: str | None,
    status: int,
    error_type: str | None,
) -> None:
    set_attributes(
        span,
        {
            "flywheel.stream.chunks": chunks,
            "flywheel.stream.complete": complete,
            "flywheel.client_disconnected": disconnected,
            "gen_ai.response.finish_reasons": [finish] if finish else None,
            "error.type": error_type,
        },
    )
    mark_error(span, status, error_type)
    span.end()
