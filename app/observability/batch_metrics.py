"""Batch execution in the gateway's /metrics: workers count, Redis holds, gateways expose.

A worker counts in memory (`BatchStats`) and flushes every second: counter increments
into the `{prefix}batch:stats` hash, its gauges into `{prefix}batch:workers` (worker id →
JSON). Whichever gateway process answers a scrape reads both hashes (one round trip) and
exposes them once, never summed over gateway processes, like the records queue.

A flush is applied exactly once: it carries the worker's sequence number, which the
script remembers, so a flush retried after a timeout that had in fact been applied adds
nothing, and one that failed is retried as it was, losing nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.files.batch_lines import SUPPORTED_ENDPOINTS

log = logging.getLogger("flywheel.batches")

CALL_TIMEOUT_S = 1.0
FRESH_S = 15.0  # a worker's gauges count while its last flush is this recent
FORGET_S = 86_400.0  # a worker silent this long is dropped from the hashes

# Label values are bounded: anything else is counted as "other".
ENDPOINTS = frozenset(SUPPORTED_ENDPOINTS)
OUTCOMES = frozenset({"completed", "failed"})
STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
OTHER = "other"

# KEYS: stats, workers, flushed sequence numbers. ARGV: worker id, sequence number (0:
# no increments), in flight, active, forget after (s), then field/increment pairs.
_FLUSH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seq = tonumber(ARGV[2])
local applied = 0
if seq > tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0') then
  for i = 6, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
  applied = 1
end
local gauges = {in_flight = tonumber(ARGV[3]), active = tonumber(ARGV[4]), ts = now}
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(gauges))
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local ok, info = pcall(cjson.decode, all[i + 1])
  local ts = ok and type(info) == 'table' and tonumber(info.ts) or nil
  if ts == nil or now - ts > tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[2], all[i])
    redis.call('HDEL', KEYS[3], all[i])
  end
end
return applied
"""


def stats_key(prefix: str) -> str:
    return f"{prefix}batch:stats"


def workers_key(prefix: str) -> str:
    return f"{prefix}batch:workers"


def _flushed_key(prefix: str) -> str:
    return f"{prefix}batch:flushed"


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


class YieldCounts(Protocol):
    """What the live-queue gate counts (`LiveQueueGate`)."""

    yields: int
    yield_seconds: float


class BatchStats:
    """A worker's batch counters and gauges, flushed to Redis by `run_forever`.

    The executor sets `lines_in_flight` and `batches_active` and calls the `line_*` and
    `batch_finished` methods; yields are read from `gate` at each flush."""

    def __init__(
        self, redis: Redis, prefix: str, worker_id: str, gate: YieldCounts | None = None
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.worker_id = worker_id
        self._gate = gate
        self._script = redis.register_script(_FLUSH)
        self.lines_in_flight = 0
        self.batches_active = 0
        self._pending: defaultdict[str, float] = defaultdict(float)
        # A flush that failed, sent again as it was (same sequence number) until it lands.
        self._unsent: tuple[int, dict[str, float]] | None = None
        self._seq = 0
        self._seen_yields = (0, 0.0)
        self._failing = False

    def line_finished(self, endpoint: str, *, ok: bool) -> None:
        outcome = "completed" if ok else "failed"
        self._pending[f"lines|{_bounded(endpoint, ENDPOINTS)}|{outcome}"] += 1

    def line_retried(self, attempts: int = 1) -> None:
        self._pending["retries"] += attempts

    def batch_finished(self, status: str) -> None:
        self._pending[f"finished|{_bounded(status, STATUSES)}"] += 1

    def _harvest_yields(self) -> None:
        if self._gate is None:
            return
        yields, seconds = self._gate.yields, self._gate.yield_seconds
        self._pending["yields"] += yields - self._seen_yields[0]
        self._pending["yield_seconds"] += seconds - self._seen_yields[1]
        self._seen_yields = (yields, seconds)

    async def flush(self) -> bool:
        """Send what was counted since the last flush, and the gauges; False on failure
        (the increments are kept and sent by a later flush)."""
        self._harvest_yields()
        if self._unsent is None:
            increments = {k: v for k, v in self._pending.items() if v}
            self._pending.clear()
            if increments:
                self._seq += 1
                self._unsent = (self._seq, increments)
        seq, increments = self._unsent or (0, {})
        args: list[str | float] = [
            self.worker_id,
            seq,
            self.lines_in_flight,
            self.batches_active,
            FORGET_S,
        ]
        for name, value in sorted(increments.items()):
            args += [name, repr(value)]
        keys = [stats_key(self._prefix), workers_key(self._prefix), _flushed_key(self._prefix)]
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as e:
            if not self._failing:  # one warning per outage
                log.warning("batch metrics not flushed (%s); kept for later", type(e).__name__)
            self._failing = True
            return False
        self._failing = False
        self._unsent = None
        return True

    async def run_forever(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    async def close(self) -> None:
        """A last flush, then this worker's gauges go (they would lapse in FRESH_S)."""
        if not await self.flush():
            return
        with contextlib.suppress(RedisError, OSError, TimeoutError):  # else it lapses
            async with asyncio.timeout(CALL_TIMEOUT_S):
                hdel = self._redis.hdel(workers_key(self._prefix), self.worker_id)
                await cast(Awaitable[int], hdel)


@dataclass(slots=True)
class BatchSnapshot:
    counters: dict[str, float] = field(default_factory=dict)
    in_flight: float = 0.0
    active: float = 0.0


async def read_batch_stats(redis: Redis, prefix: str, fresh_s: float = FRESH_S) -> BatchSnapshot:
    """Both hashes and the server's time in one round trip; gauges of fresh workers."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(stats_key(prefix))
        pipe.hgetall(workers_key(prefix))
        pipe.time()
        stats, workers, (secs, micros) = await pipe.execute()
    now = secs + micros / 1e6
    snap = BatchSnapshot()
    for name, value in stats.items():
        try:
            snap.counters[name.decode()] = float(value)
        except (ValueError, UnicodeDecodeError):
            continue
    for raw in workers.values():
        try:
            info = orjson.loads(raw)
            if now - float(info["ts"]) <= fresh_s:
                snap.in_flight += float(info.get("in_flight", 0))
                snap.active += float(info.get("active", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return snap


class BatchCollector(Collector):
    def __init__(self, snapshot: BatchSnapshot) -> None:
        self._snap = snapshot

    def collect(self) -> Iterator[Metric]:
        lines: defaultdict[tuple[str, str], float] = defaultdict(float)
        finished: defaultdict[str, float] = defaultdict(float)
        for name, value in self._snap.counters.items():
            kind, _, rest = name.partition("|")
            if kind == "lines":
                endpoint, _, outcome = rest.partition("|")
                lines[_bounded(endpoint, ENDPOINTS), _bounded(outcome, OUTCOMES)] += value
            elif kind == "finished":
                finished[_bounded(rest, STATUSES)] += value
        family = CounterMetricFamily(
            "flywheel_batch_lines", "Batch lines finished", labels=["endpoint", "outcome"]
        )
        for (endpoint, outcome), n in sorted(lines.items()):
            family.add_metric([endpoint, outcome], n)
        yield family
        done = CounterMetricFamily("flywheel_batch_finished", "Batches ended", labels=["status"])
        for status, n in sorted(finished.items()):
            done.add_metric([status], n)
        yield done
        get = self._snap.counters.get
        yield CounterMetricFamily(
            "flywheel_batch_line_retries",
            "Batch line attempts retried after a retryable failure",
            value=get("retries", 0.0),
        )
        yield CounterMetricFamily(
            "flywheel_batch_yields",
            "Times a batch line waited for live requests queued on its deployment",
            value=get("yields", 0.0),
        )
        yield CounterMetricFamily(
            "flywheel_batch_yield_seconds",
            "Seconds batch lines waited for live traffic",
            value=get("yield_seconds", 0.0),
        )
        yield GaugeMetricFamily(
            "flywheel_batch_lines_in_flight",
            "Batch lines calling an upstream now, over every live worker",
            value=self._snap.in_flight,
        )
        yield GaugeMetricFamily(
            "flywheel_batch_active",
            "Batches being executed now, over every live worker",
            value=self._snap.active,
        )


def batch_exposition(snapshot: BatchSnapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BatchCollector(snapshot))
    return generate_latest(registry)
