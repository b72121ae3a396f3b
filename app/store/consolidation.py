"""Incremental consolidation: the Redis request stream into the database, exactly once.

Workers read the stream through one consumer group, a few entries at a time (each entry
is one 50 ms batch of records from one gateway), write them in one short transaction
keyed by the request id (a replayed entry inserts nothing new), and only then
acknowledge and delete the entries. So the stream holds exactly what is not yet in the
database, and its length is the queue. A worker killed mid-batch leaves its entries
pending; another worker (or its restart) claims them once they have been idle for
`claim_idle_s`. While the database is down, entries stay where they are and are retried
with backoff; one warning per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.observability.tracing import Tracing, context_of
from app.store.rows import Rows, insert_rows, matched_feedback, rows_of

log = logging.getLogger("flywheel.consolidation")

GROUP = "consolidators"
MAX_BACKOFF_S = 30.0
Entry = tuple[bytes, dict[bytes, bytes]]


def stream_key(prefix: str) -> str:
    return prefix + "requests"


def stats_key(prefix: str) -> str:
    return prefix + "consolidation"


def late_key(prefix: str) -> str:
    return prefix + "metrics:late"


def dead_key(prefix: str) -> str:
    """Records the database refused as data (not as an outage), kept for an operator."""
    return prefix + "requests:dead"


@dataclass(slots=True)
class ConsolidatorConfig:
    prefix: str
    consumer: str
    batch_size: int = 10
    delay_s: float = 0.05
    claim_idle_s: float = 30.0
    block_s: float = 1.0


@dataclass(slots=True)
class Consolidator:
    redis: Redis
    engine: AsyncEngine
    config: ConsolidatorConfig
    processed: int = 0
    _own_pending: bool = True  # entries this consumer read but did not ack (after errors)
    _next_claim: float = 0.0
    _failures: int = 0
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # With tracing on, each stored record gets a span in its request's trace.
    tracing: Tracing | None = None
    # Stored feedback that names a request of its tenant goes here (LangSmith).
    # (request id, score, comment, the request's start: where LangSmith files its run)
    on_feedback: Callable[[str, float, str | None, datetime], None] | None = None

    @property
    def stream(self) -> str:
        return stream_key(self.config.prefix)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consolidate until `stop()`; the batch in hand is always finished first."""
        while not self._stopping.is_set():
            try:
                written = await self.step()
            except (RedisError, OSError) as e:
                written = -1
                self._outage("Redis", e)
            except Exception:  # a bug must not end consolidation for good: log, retry
                log.exception("consolidation step failed")
                written = -1
                self._failures += 1
            if written < 0:
                await self._pause(min(MAX_BACKOFF_S, 0.5 * 2 ** min(self._failures, 6)))
            elif written > 0 and self.config.delay_s:
                await self._pause(self.config.delay_s)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def step(self) -> int:
        """One batch: records (and feedback) handled (0 when there was nothing, -1 when it
        must wait)."""
        try:
            entries = await self._next_entries()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # Redis lost the stream (restarted empty, flushed): a gateway's next record
            # made a new one without the group. Make it again and go on.
            log.warning("request stream lost its consumer group; creating it again")
            await self.ensure_group()
            return 0
        if not entries:
            return 0
        records, unreadable = _decode(entries)
        rows, refused = rows_of(records)
        if unreadable or refused:
            # Never writable as they are: kept whole for an operator, not retried forever.
            log.error("%d request records set aside as unreadable", len(unreadable) + len(refused))
            await self._dead_letter([*unreadable, *refused], "unreadable")
        started = time.time_ns()
        try:
            await insert_rows(self.engine, rows)
        except (SQLAlchemyError, OSError) as e:
            if _is_outage(e):
                self._outage("database", e)
                self._own_pending = True  # retried from the pending list, in order
                return -1
            await self._one_by_one(rows, records)
        if self.tracing is not None and self.tracing.enabled:
            self._trace(records, started)
        if self.on_feedback is not None and rows.feedback:
            await self._forward_feedback(rows)
        oldest = min((r["created_at"] for r in rows.requests), default=None)
        await self._ack(entries, len(rows.requests), oldest)
        self._recovered()
        return len(rows.requests) + len(rows.feedback)

    async def _forward_feedback(self, rows: Rows) -> None:
        """Stored scores, on requests of the tenant that gave them, to `on_feedback`."""
        assert self.on_feedback is not None
        ids = [str(f["request_id"]) for f in rows.feedback]
        try:
            matched = await matched_feedback(self.engine, rows.feedback)
        except (SQLAlchemyError, OSError) as e:
            # Stored already; only the forwarding is lost, not worth holding the stream.
            log.warning("feedback not forwarded: database unavailable (%s)", type(e).__name__)
            return
        if len(matched) < len(set(ids)):
            log.info(
                "%d feedback items name no request of theirs (yet)", len(set(ids)) - len(matched)
            )
        for request_id, score, comment, started in matched:
            self.on_feedback(request_id, score, comment, started)

    def _trace(self, records: list[dict[str, Any]], started_ns: int) -> None:
        """A span per stored record, in the trace of the request it records (the gateway
        put the request's `traceparent` in it), covering the batch's write."""
        assert self.tracing is not None
        ended = time.time_ns()
        for rec in records:
            parent = context_of((rec.get("extra") or {}).get("traceparent"))
            if parent is None:
                continue
            span = self.tracing.tracer.start_span(
                "consolidate request",
                context=parent,
                start_time=started_ns,
                attributes={
                    "flywheel.request_id": str(rec.get("request_id")),
                    "flywheel.batch_size": len(records),
                    "flywheel.consumer": self.config.consumer,
                },
            )
            span.end(end_time=ended)

    async def _next_entries(self) -> list[Entry]:
        batch = self.config.batch_size
        if self._own_pending:
            own = await self._read("0", batch, block_ms=None)
            if own:
                return own
            self._own_pending = False
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self.config.claim_idle_s / 2
            claimed = await self._claim(batch)
            if claimed:
                self._next_claim = 0.0  # there may be more: look again next step
                return claimed
        return await self._read(">", batch, block_ms=int(self.config.block_s * 1000))

    async def _read(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            GROUP, self.config.consumer, {self.stream: start}, count=count, block=block_ms
        )
        if not reply:
            return []
        entries: list[Entry] = reply[0][1]
        # Pending entries trimmed from the stream (MAXLEN, while the database was away)
        # come back without fields: their records are lost; say so, count, ack them away.
        gone = [eid for eid, fields in entries if not fields]
        if gone:
            log.error("%d request stream entries were trimmed before consolidation", len(gone))
            await cast(
                Awaitable[int],
                self.redis.hincrby(stats_key(self.config.prefix), "trimmed", len(gone)),
            )
            await self.redis.xack(self.stream, GROUP, *gone)
        return [(eid, fields) for eid, fields in entries if fields]

    async def _claim(self, count: int) -> list[Entry]:
        """Entries another consumer read and never acknowledged (it died mid-batch)."""
        reply = await self.redis.xautoclaim(
            self.stream,
            GROUP,
            self.config.consumer,
            min_idle_time=int(self.config.claim_idle_s * 1000),
            start_id="0-0",
            count=count,
        )
        entries: list[Entry] = reply[1] if len(reply) > 1 else []
        if entries:
            log.info("claimed %d request stream entries left by another worker", len(entries))
        return [(eid, fields) for eid, fields in entries if fields]

    async def _ack(self, entries: list[Entry], records: int, oldest: datetime | None) -> None:
        ids = [eid for eid, _ in entries]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, GROUP, *ids)
        pipe.xdel(self.stream, *ids)
        if oldest is not None:
            # The oldest request time written since the metrics job last looked: it
            # re-aggregates from there, so rows that land late (after an outage) count.
            pipe.zadd(late_key(self.config.prefix), {"oldest": oldest.timestamp()}, lt=True)
        pipe.hincrby(stats_key(self.config.prefix), "processed", records)
        pipe.hincrby(stats_key(self.config.prefix), "batches", 1)
        pipe.hset(stats_key(self.config.prefix), "last_batch_at", str(time.time()))
        await pipe.execute()
        self.processed += records

    async def _one_by_one(self, rows: Rows, records: list[dict[str, Any]]) -> None:
        """A batch the database refused as data: write what it takes, set the rest aside."""
        # Feedback shares its request's id: the two must not be mistaken for each other.
        by_id = {str(r.get("request_id")): r for r in records if r.get("kind") != "feedback"}
        feedback = {
            (str(r.get("request_id")), str(r.get("tenant") or "anonymous")): r
            for r in records
            if r.get("kind") == "feedback"
        }
        for single in rows.split():
            try:
                await insert_rows(self.engine, single)
            except (SQLAlchemyError, OSError) as e:
                if _is_outage(e):
                    raise
                log.error("request %s refused by the database: %s", single.ids(), type(e).__name__)
                refused = [by_id.get(str(row["id"]), row) for row in single.requests] + [
                    feedback.get((str(f["request_id"]), str(f["tenant"])), f)
                    for f in single.feedback
                ]
                await self._dead_letter(refused, type(e).__name__)

    async def _dead_letter(self, records: list[Any], reason: str) -> None:
        for rec in records:
            payload = rec if isinstance(rec, bytes) else orjson.dumps(rec, default=str)
            await self.redis.xadd(
                dead_key(self.config.prefix),
                {"record": payload, "reason": reason},
                maxlen=10_000,
                approximate=True,
            )

    def _outage(self, what: str, e: BaseException) -> None:
        if self._failures == 0:
            log.warning("consolidation paused: %s unavailable (%s)", what, type(e).__name__)
        self._failures += 1

    def _recovered(self) -> None:
        if self._failures:
            log.warning("consolidation resumed after %d failed attempts", self._failures)
            self._failures = 0


async def prune_consumers(redis: Redis, prefix: str, idle_s: float = 3600.0) -> int:
    """Forget consumers of workers long gone (every worker start adds one): only those
    holding nothing, so no pending entry loses its owner before it is claimed."""
    try:
        consumers = await redis.xinfo_consumers(stream_key(prefix), GROUP)
    except ResponseError:
        return 0
    pruned = 0
    for c in consumers:
        if int(c["pending"]) == 0 and int(c["idle"]) > idle_s * 1000:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            await redis.xgroup_delconsumer(stream_key(prefix), GROUP, name)
            pruned += 1
    return pruned


def _decode(entries: list[Entry]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The records of the entries, and the raw entries that are not batches of records."""
    records: list[dict[str, Any]] = []
    unreadable: list[bytes] = []
    for _, fields in entries:
        raw = fields.get(b"records", b"")
        try:
            batch = orjson.loads(raw)
        except orjson.JSONDecodeError:
            unreadable.append(raw)
            continue
        if not isinstance(batch, list):
            unreadable.append(raw)
            continue
        records.extend(batch)
    return records, unreadable


def _is_outage(e: SQLAlchemyError | OSError) -> bool:
    """Connection trouble (retry later) rather than a row the database will never take."""
    if isinstance(e, OSError):  # refused or timed out connecting (drivers raise these raw)
        return True
    if isinstance(e, DBAPIError):
        return bool(e.connection_invalidated) or type(e).__name__ in (
            "OperationalError",
            "InterfaceError",
        )
    return True  # pool timeouts and the like


async def consolidation_status(redis: Redis, prefix: str) -> dict[str, Any]:
    """Queue length, pending, processed and lag, as `/health/detailed` and metrics show."""
    stream = stream_key(prefix)
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xrange(stream, count=1)
    pipe.hgetall(stats_key(prefix))
    pipe.xlen(dead_key(prefix))
    length, oldest, stats, dead = await pipe.execute()
    try:
        pending_info = await redis.xpending(stream, GROUP)
        pending = int(pending_info["pending"])
    except ResponseError:  # no group yet: no worker ever started
        pending = 0
    lag_s = 0.0
    if oldest:
        lag_s = max(0.0, time.time() - int(oldest[0][0].split(b"-")[0]) / 1000)
    raw = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], stats).items()}
    last = float(raw["last_batch_at"]) if "last_batch_at" in raw else None
    return {
        "queue_length": int(length),
        "trimmed": int(raw.get("trimmed", 0)),
        "pending": pending,
        "processed": int(raw.get("processed", 0)),
        "batches": int(raw.get("batches", 0)),
        "lag_s": round(lag_s, 3),
        "last_batch_at": last,
        "dead_letters": int(dead),
    }
