"""One line of a batch: its request through the gateway's own handler, with retries.

The line goes to `app.api.chat.handle` (or `embeddings.handle`) on the worker's runtime
as the batch's owner, so routing, retries and fallbacks within the request, breakers,
the cache, the key's limits and budget and the request record are all live traffic's.
Before each attempt takes a deployment, the line waits while live requests are queued
for that deployment in any gateway (`LiveQueueGate`); the wait does not count against
the request's deadline.

Around the request, the batch's own retries: an upstream's 408, 429 or 5xx is tried
again up to FLYWHEEL_BATCH_LINE_ATTEMPTS times with jittered backoff (never sooner than
its Retry-After); the gateway's own "wait" answers (the key's rate limits, every
deployment at its concurrency limit) are waited out without using up a try; anything
else (a 4xx, a spent budget) is the line's final answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from app.api import chat, embeddings
from app.api.auth import Caller
from app.api.body import BodyReader
from app.api.exchange import BatchTag
from app.api.middleware import new_request_id
from app.auth.resolver import KeyInfo
from app.errors import GatewayError, UpstreamError
from app.files.batch_lines import CHAT_ENDPOINT, BadLine, BatchLine
from app.routing.live_queue import LiveQueueGate
from app.state import AppState
from app.store.schema import ApiKey
from workers.batch_files import result_line, unrun_line
from workers.batch_journal import Done

RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# The gateway's own answers that mean "not now" rather than "failed".
WAIT_CODES = frozenset({"rate_limit_exceeded", "deployments_saturated"})
RATE_LIMIT_WAITS = 100  # how often those may hold a line back before it gives up
REVOKED = "The API key that created this batch is revoked or expired."


def is_wait(error: GatewayError) -> bool:
    """A refusal by the gateway itself to do it now (not an upstream's failure)."""
    return not isinstance(error, UpstreamError) and error.code in WAIT_CODES


def retry_after(error: GatewayError) -> float:
    headers = {name.lower(): value for name, value in error.headers.items()}
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        return float(headers.get("retry-after") or 0)
    except ValueError:
        return 0.0


def retry_wait(error: GatewayError, tries: int, max_tries: int, waits: int) -> float | None:
    """Seconds to wait before trying the line again; None: its error is final."""
    if error.status not in RETRYABLE or error.code == "insufficient_quota":
        return None
    waiting = is_wait(error)
    if (waits >= RATE_LIMIT_WAITS) if waiting else (tries >= max_tries):
        return None
    backoff = min(30.0, 0.5 * 2 ** max(0, tries - 1)) * (0.5 + random.random())
    return max(retry_after(error), 0.05 if waiting else backoff)


async def owner_of(state: AppState, owner: str | None) -> Caller | None:
    """The batch's owner as a caller; None when its key is gone, revoked or expired."""
    if owner is None:
        return Caller("master", master=True)
    async with AsyncSession(state.engine) as session:
        row = await session.get(ApiKey, owner)
    if row is None:
        return None
    info = KeyInfo.of(row)
    if not info.usable(time.time()):
        return None
    return Caller.of_key(info)


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass(slots=True)
class LineRunner:
    state: AppState
    batch_id: str
    endpoint: str
    gate: LiveQueueGate
    stop: asyncio.Event
    max_tries: int
    caller: Caller | None = None
    on_retry: Callable[[], object] | None = None  # each try again (the batch's metrics)

    @property
    def tag(self) -> BatchTag:
        return BatchTag(self.batch_id, self._yield_to_live)

    async def _yield_to_live(self, route: str, deployment: str) -> float:
        waited: float = await self.gate.wait_clear(route, deployment, self.stop)
        return waited

    async def run(self, line: BatchLine | BadLine, final: Callable[[], bool]) -> Done | None:
        """The line's result; None when the batch stopped it before it had one that
        should stand (a stopping worker's successor runs it). `final()` says whether a
        stop still lets a result stand (a cancel, an expiry) or not (a shutdown)."""
        if isinstance(line, BadLine):
            return Done(line.line, False, unrun_line(None, line.code, line.message))
        if self.caller is None:
            return Done(line.number, False, unrun_line(line.custom_id, "invalid_api_key", REVOKED))
        handle = chat.handle if self.endpoint == CHAT_ENDPOINT else embeddings.handle
        raw = orjson.dumps(line.body)
        headers = {"content-length": str(len(raw))}
        attributes = {
            "flywheel.batch_id": self.batch_id,
            "flywheel.batch.line": line.number,
            "flywheel.batch.custom_id": line.custom_id,
        }
        tries = waits = 0
        while True:
            rid = new_request_id(self.endpoint)
            with self.state.tracing.span("batch.line", attributes):
                try:
                    response = await handle(
                        self.state, rid, _reader(raw), headers, caller=self.caller, batch=self.tag
                    )
                except GatewayError as e:
                    error = e
                else:
                    body = orjson.loads(bytes(response.body))
                    return Done(line.number, True, result_line(line.custom_id, rid, 200, body))
            waiting = is_wait(error)
            waits, tries = (waits + 1, tries) if waiting else (waits, tries + 1)
            wait = retry_wait(error, tries, self.max_tries, waits)
            if wait is not None and self.stop.is_set() and not final():
                return None  # it would have been tried again: the successor does
            if wait is None or self.stop.is_set():
                result = result_line(line.custom_id, rid, error.status, error.body())
                return Done(line.number, False, result)
            if self.on_retry is not None:
                self.on_retry()
            await pause(self.stop, wait)


def _reader(raw: bytes) -> BodyReader:
    async def read(limit: int) -> bytes:
        return raw

    return read
