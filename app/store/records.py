"""Request records: built on the request path, shipped to a Redis stream off it.

`Recorder.record` only appends the record to a bounded in-process buffer; a background
task ships the buffer every `interval_s` as one stream entry holding a JSON array of
records (one Redis round trip per interval, not per request: per-request XADDs cost as
much CPU as the request itself at low concurrency). Workers consolidate the stream into
the database. When Redis is down the buffer holds what it can and the oldest records are
dropped (and counted), so a Redis outage never slows or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.background import stop_tasks
from app.observability.redact import Redactors
from app.store.owners import Owners

if TYPE_CHECKING:  # the access log renders these records
    from app.observability.access_log import AccessLog

log = logging.getLogger("flywheel.records")

# Stream entries are batches, so this bounds Redis at roughly this many intervals.
STREAM_MAXLEN = 50_000
BATCH_MAX = 1000
_ALL = Redactors()


def encode_batch(batch: list[Shipped], redactors: Redactors = _ALL) -> bytes:
    """The stream entry of a batch; bodies (rare: only routes that opt in) redacted, each
    by its route's redactor."""
    for rec in batch:
        if isinstance(rec, FeedbackRecord):
            if rec.comment:
                rec.comment = redactors.default.text(rec.comment)
            continue
        if rec.bodies is not None and not rec.bodies.get("redacted"):
            # By the route the client asked for (its policy), not a fallback that answered.
            route = rec.bodies.pop("route", None) or rec.route
            rec.bodies = {**redactors.of(route).value(rec.bodies), "redacted": True}
    return orjson.dumps(batch)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    route: str | None
    deployment: str | None
    provider: str | None
    model: str | None
    status: int
    stream: bool
    started_at: float
    latency_ms: float
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    finish_reason: str | None = None
    error_code: str | None = None
    client_disconnected: bool = False
    usage_estimated: bool = False
    attempts: int = 1
    cache: str = "bypass"  # the cache tier that answered: hit-l1, hit-l2, miss, bypass
    tenant: str | None = None
    key_id: str | None = None
    variant: str | None = None
    trace_id: str | None = None
    error_type: str | None = None
    # Only for routes that store bodies: {"request": …, "response": …, "retention_s": …},
    # redacted by the recorder off the request path before it leaves the process.
    bodies: dict[str, Any] | None = None
    # The quality rules' score in [0, 1] and why (`app.cycle.rules`); None: not judged.
    quality: float | None = None
    quality_reasons: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class FeedbackRecord:
    """A score for a past answer (POST /v1/feedback), shipped with the request records:
    the same buffer, stream and consolidation, so a Redis outage loses none of it."""

    request_id: str
    score: float
    tenant: str | None
    created_at: float
    comment: str | None = None
    kind: str = "feedback"


Shipped = RequestRecord | FeedbackRecord


def decode_entries(entries: Sequence[tuple[Any, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The records inside stream entries (as XRANGE / XREADGROUP return them), in order."""
    out: list[dict[str, Any]] = []
    for _id, fields in entries:
        out.extend(orjson.loads(fields[b"records"]))
    return out


class Recorder:
    def __init__(
        self,
        redis: Redis | None,
        stream_key: str,
        *,
        capacity: int = 50_000,
        interval_s: float = 0.05,
        maxlen: int = STREAM_MAXLEN,
        redactors: Redactors = _ALL,
        access: AccessLog | None = None,
        owners: Owners | None = None,
    ) -> None:
        self._redis = redis
        # Who made each request: remembered here, indexed in Redis with each batch.
        self.owners = owners
        self._access = access
        self._redactors = redactors
        self._stream = stream_key
        self._capacity = capacity
        self._interval_s = interval_s
        self._maxlen = maxlen
        self._outage_dropped = 0  # dropped since the last successful shipment
        self._buffer: deque[Shipped] = deque()
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self.dropped = 0
        self.shipped = 0

    def record(self, rec: RequestRecord) -> None:
        if self._access is not None:
            self._access.add(rec)
        if self.owners is not None and rec.tenant is not None:
            self.owners.remember(rec.request_id, rec.tenant)
        self.ship(rec)

    def ship(self, rec: Shipped) -> None:
        """Buffer `rec` for the stream (a request record, or feedback: not counted as a
        request, not in the access log)."""
        if self._redis is None:
            # No Redis configured at all: there is nowhere to ship to, so keep nothing.
            self.dropped += 1
            return
        if len(self._buffer) >= self._capacity:
            self._buffer.popleft()
            self._count_drops(1)
        self._buffer.append(rec)

    def _count_drops(self, n: int) -> None:
        if n <= 0:
            return
        if self._outage_dropped == 0:
            log.warning("request record buffer full: dropping the oldest records")
        self.dropped += n
        self._outage_dropped += n

    @property
    def ships(self) -> bool:
        """Whether anything recorded can reach the workers (there is a Redis)."""
        return self._redis is not None

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        if self._redis is not None and self._task is None:
            self._task = asyncio.create_task(self._ship_forever(), name="flywheel-recorder")

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        if self._task is None:
            return
        await stop_tasks(self._task)
        self._task = None
        # The lock waits for a flush the cancel interrupted (it is shielded), then drains.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), drain_timeout_s)
        if self._buffer:
            # Redis is down as we stop: these records have nowhere to go.
            self._count_drops(len(self._buffer))
            log.error("stopping with %d request records unshipped: lost", len(self._buffer))
            self._buffer.clear()

    async def flush(self) -> bool:
        """Ship everything buffered; False (records kept) when Redis fails."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        assert self._redis is not None
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), BATCH_MAX))]
            if any(isinstance(rec, FeedbackRecord) or rec.bodies is not None for rec in batch):
                # Redaction is regex work over whole bodies: not on the event loop.
                payload = await asyncio.to_thread(encode_batch, batch, self._redactors)
            else:
                payload = orjson.dumps(batch)
            try:
                await self._send(batch, payload)
            except (RedisError, OSError) as e:
                log.warning("request records not shipped (%s); keeping them", type(e).__name__)
                room = self._capacity - len(self._buffer)
                self._count_drops(len(batch) - room)
                self._buffer.extendleft(reversed(batch[len(batch) - max(0, room) :]))
                return False
            self.shipped += len(batch)
        if self._outage_dropped:
            log.warning("request records shipped again; %d were dropped", self._outage_dropped)
            self._outage_dropped = 0
        return True

    async def _send(self, batch: list[Shipped], payload: bytes) -> None:
        """The batch's stream entry and its owners' index, in one round trip."""
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._stream, {"records": payload}, maxlen=self._maxlen, approximate=True)
        if self.owners is not None:
            self.owners.add_to(
                pipe,
                (
                    (rec.request_id, rec.tenant)
                    for rec in batch
                    if isinstance(rec, RequestRecord) and rec.tenant is not None
                ),
            )
        added, *indexed = await pipe.execute(raise_on_error=False)
        if isinstance(added, Exception):
            raise added
        failed = [type(r).__name__ for r in indexed if isinstance(r, Exception)]
        if failed:
            # The batch is shipped; only early feedback checks lose these ids (the
            # database answers for them once they are consolidated).
            log.warning("request owners not indexed (%s)", failed[0])

    async def _ship_forever(self) -> None:
        backoff = self._interval_s
        while True:
            await asyncio.sleep(backoff)
            try:
                # Shielded: stopping must not drop a batch already taken from the buffer.
                shipped = await asyncio.shield(self.flush())
            except Exception:  # a bug must not end shipping for good: log, back off
                log.exception("shipping request records failed")
                shipped = False
            backoff = self._interval_s if shipped else min(backoff * 2, 5.0)
