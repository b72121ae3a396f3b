"""The access log: one line per request, with the facts of its request record.

`AccessLog.add` is on the request path, so it only appends the record to a bounded deque
(a fraction of a microsecond). Every `interval_s` a task hands what has gathered to the
logging system as one log record; the logging thread (see `configure_logging`) renders
one line per request as it writes. A per-request `logger.info` would cost about 25 µs of
the event loop's time, a quarter of a cached answer's whole cost. Rendering still takes
CPU (a few µs a line) in the same process; `make bench` measured it on cache hits.

Bodies are never in a line unless FLYWHEEL_ACCESS_LOG_BODIES is on (and then only for
routes that keep bodies), masked like everything else that is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import orjson

from app.background import stop_tasks
from app.observability.redact import redact, redact_text
from app.store.records import RequestRecord

log = logging.getLogger("flywheel.access")
# The logging thread renders a batch holding the GIL, which Python hands over only every
# 5 ms (sys.getswitchinterval) unless released: a few dozen lines at a time, then it is.
YIELD_EVERY = 32

# The record's fields a line carries, in this order (bodies and `extra` are not facts).
FACTS = (
    "request_id",
    "trace_id",
    "endpoint",
    "route",
    "deployment",
    "provider",
    "model",
    "variant",
    "status",
    "error_type",
    "error_code",
    "stream",
    "cache",
    "attempts",
    "latency_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "usage_estimated",
    "cost",
    "finish_reason",
    "client_disconnected",
    "tenant",
    "key_id",
)


def facts(rec: RequestRecord, bodies: bool) -> dict[str, Any]:
    out = {name: getattr(rec, name) for name in FACTS}
    out["latency_ms"] = round(rec.latency_ms, 3)
    if rec.ttft_ms is not None:
        out["ttft_ms"] = round(rec.ttft_ms, 3)
    if rec.error_code:
        out["error_code"] = redact_text(rec.error_code)  # an upstream's code, passed on
    if bodies and rec.bodies is not None:
        out["bodies"] = redact(rec.bodies)
    return out


def _timestamp(epoch: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}Z"
    )


_HEAD = '{"ts":"%s","level":"info","logger":"flywheel.access","msg":"request",'


def render_json(batch: list[RequestRecord], bodies: bool) -> str:
    """One JSON object per line. The record itself is what orjson serialises (natively,
    ~1 µs); only records that need changing (bodies to drop or mask, an upstream's error
    code to mask) go through `facts`."""
    lines = []
    stamp_s, stamp = -1, ""
    for i, rec in enumerate(batch):
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)  # give the GIL back: the event loop waits on it meanwhile
        ended = rec.started_at + rec.latency_ms / 1000
        if int(ended) != stamp_s:  # one strftime per second of requests, not per line
            stamp_s = int(ended)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp_s))
        ts = f"{stamp}.{int(ended * 1000) % 1000:03d}Z"
        if rec.bodies is None and not rec.error_code:
            body = orjson.dumps(rec, option=orjson.OPT_OMIT_MICROSECONDS).decode()
        else:
            body = orjson.dumps(facts(rec, bodies)).decode()
        lines.append(_HEAD % ts + body[1:])
    return "\n".join(lines)


def render_text(batch: list[RequestRecord], bodies: bool) -> str:
    lines = []
    for i, rec in enumerate(batch):
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)
        fields = " ".join(
            f"{k}={orjson.dumps(v).decode() if k == 'bodies' else v}"
            for k, v in facts(rec, bodies).items()
            if v is not None and k not in ("request_id", "trace_id")
        )
        ids = " ".join(v for v in (rec.request_id, rec.trace_id) if v)
        stamp = _timestamp(rec.started_at + rec.latency_ms / 1000)
        lines.append(f"{stamp} INFO {log.name}: request {fields} [{ids}]")
    return "\n".join(lines)


class AccessLog:
    def __init__(
        self, bodies: bool = False, *, capacity: int = 50_000, interval_s: float = 0.1
    ) -> None:
        self._pending: deque[RequestRecord] = deque(maxlen=capacity)
        self._bodies = bodies
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def add(self, rec: RequestRecord) -> None:
        self._pending.append(rec)  # full: the oldest goes (the logging thread is behind)

    def flush(self) -> None:
        if not self._pending or not log.isEnabledFor(logging.INFO):
            self._pending.clear()
            return
        batch = list(self._pending)
        self._pending.clear()
        log.info("requests", extra={"requests": batch, "bodies": self._bodies})

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="flywheel-access-log")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.flush()
