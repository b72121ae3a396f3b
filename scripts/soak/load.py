"""The open-loop load: request n is due at t0 + n / rate and is sent then, whether or not
earlier ones have been answered (a closed loop would slow down with the gateway and hide
its trouble). Latency is counted from when a request was due, so a stalled sender or a
queue in front of the gateway shows up in it, not just the time on the wire.

In flight at once is capped (a run never grows without bound): a request due while the
cap is reached is not sent and counts as an unexpected error ("overload").
Once a minute the runner closes that minute's figures (by completion time), samples the
gateway's and worker's memory and the gateway's /health/detailed, and reports the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from sqlalchemy.exc import SQLAlchemyError

from soak.rig import Rig, request_rows, tree_rss_mb
from soak.traffic import BY_NAME, HEADERS, Answer, Mix, Request, Verdict

SAMPLE_S = 5  # memory samples between minute rows (a divisor of 60)
HEALTH_TIMEOUT_S = 5.0
DRAIN_S = 60.0  # after the load: how long the request records may take to reach the database


@dataclass
class Stats:
    """Outcomes of a set of requests: latencies, verdicts, cache tiers."""

    latencies_ms: list[float] = field(default_factory=list)
    verdicts: Counter[Verdict] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)

    def add(self, latency_ms: float, verdict: Verdict, cache: str | None) -> None:
        self.latencies_ms.append(latency_ms)
        self.verdicts[verdict] += 1
        if cache is not None:
            self.cache[cache] += 1

    def count(self, category: str) -> int:
        return sum(n for (cat, _), n in self.verdicts.items() if cat == category)

    def labels(self, category: str) -> list[tuple[str, int]]:
        return sorted(
            ((label, n) for (cat, label), n in self.verdicts.items() if cat == category),
            key=lambda item: -item[1],
        )


@dataclass
class Minute:
    index: int  # 1-based
    sent: int = 0
    max_send_lag_ms: float = 0.0
    stats: Stats = field(default_factory=Stats)
    gateway_mb: float = 0.0
    worker_mb: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)
    closed: bool = False


@dataclass
class Sample:
    t_s: float  # since the load started
    gateway_mb: float
    worker_mb: float


@dataclass
class Outcome:
    minutes: list[Minute]
    samples: list[Sample]
    by_kind: dict[str, Stats]
    run_errors: Counter[str]  # unexpected conditions outside single answers
    drained_s: float | None  # how long the records took to reach the database
    final_health: dict[str, Any]
    rows: int | None  # in the database's `requests` table at the end
    aborted: str | None = None


class Soak:
    def __init__(
        self,
        rig: Rig,
        *,
        rate: float,
        minutes: int,
        seed: int,
        max_in_flight: int,
        timeout_s: float,
        on_minute: Callable[[Minute], None],
    ) -> None:
        self.rig = rig
        self.url = f"{rig.gateway.url}/v1/chat/completions"
        self.rate = rate
        self.minutes = [Minute(i + 1) for i in range(minutes)]
        self.mix = Mix(seed)
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.on_minute = on_minute
        self.by_kind: dict[str, Stats] = {name: Stats() for name in BY_NAME}
        self.samples: list[Sample] = []
        self.run_errors: Counter[str] = Counter()
        self.in_flight: set[asyncio.Task[None]] = set()
        self.aborted: str | None = None
        self.t0 = 0.0

    def minute_at(self, t: float) -> Minute:
        index = int((t - self.t0) // 60)
        return self.minutes[max(0, min(index, len(self.minutes) - 1))]

    async def run(self) -> Outcome:
        limits = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=self.max_in_flight)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with (
            aiohttp.ClientSession(connector=limits, timeout=timeout) as load,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as side,
        ):
            self.t0 = time.monotonic()
            baseline = await self.health(side)
            monitor = asyncio.create_task(self.monitor(side))
            try:
                await self.send(load)
                if self.in_flight:  # bounded: every request has its own timeout
                    await asyncio.wait(self.in_flight, timeout=self.timeout_s + 5)
            finally:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
                for task in self.in_flight:
                    task.cancel()
            # The last minute (or, after an abort, the one it happened in) closes once
            # its answers are in.
            last = self.minutes[-1] if self.aborted is None else self.minute_at(time.monotonic())
            await self.close_minute(last, side)
            drained = None if self.aborted else await self.drain(side)
            final = await self.health(side)
        rows = await self.count_rows()
        # Rows are compared only once the backlog drained (else some are on their way).
        self.check_records(baseline, final, rows if drained is not None else None)
        return Outcome(
            [m for m in self.minutes if m.closed],
            self.samples,
            self.by_kind,
            self.run_errors,
            drained,
            final,
            rows,
            self.aborted,
        )

    async def send(self, session: aiohttp.ClientSession) -> None:
        end = self.t0 + 60 * len(self.minutes)
        n = 0
        while self.aborted is None:
            due = self.t0 + n / self.rate
            if due >= end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            minute = self.minute_at(due)
            minute.sent += 1
            minute.max_send_lag_ms = max(minute.max_send_lag_ms, (time.monotonic() - due) * 1000)
            request = self.mix.next(n)
            n += 1
            if len(self.in_flight) >= self.max_in_flight:
                verdict = ("unexpected", f"overload ({self.max_in_flight} in flight)")
                self.record(request, due, verdict, None)
                continue
            task = asyncio.create_task(self.one(session, request, due))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def one(self, session: aiohttp.ClientSession, request: Request, due: float) -> None:
        try:
            async with session.post(self.url, data=request.body, headers=HEADERS) as resp:
                text = await resp.text(errors="replace")
                answer = Answer(
                    resp.status,
                    resp.headers.get("x-flywheel-cache"),
                    resp.headers.get("content-type", ""),
                    text,
                )
        except TimeoutError:
            self.record(request, due, ("unexpected", f"timeout ({self.timeout_s:g} s)"), None)
            return
        except aiohttp.ClientError as exc:
            self.record(request, due, ("unexpected", f"client: {type(exc).__name__}"), None)
            return
        kind = BY_NAME[request.kind]
        verdict = kind.judge(answer)
        self.record(request, due, verdict, answer.cache if kind.cached else None)

    def record(self, request: Request, due: float, verdict: Verdict, cache: str | None) -> None:
        now = time.monotonic()
        latency_ms = (now - due) * 1000
        self.minute_at(now).stats.add(latency_ms, verdict, cache)
        self.by_kind[request.kind].add(latency_ms, verdict, cache)

    # Once a minute, and every SAMPLE_S in between

    async def monitor(self, side: aiohttp.ClientSession) -> None:
        """Memory samples every SAMPLE_S; a minute row at each minute's end but the last
        (closed after the last answers are in)."""
        per_minute = 60 // SAMPLE_S
        tick = 1
        while True:
            due = self.t0 + tick * SAMPLE_S
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sample = self.sample()
            if (why := self.rig.check_alive()) is not None:
                self.aborted = why
                self.run_errors["a process exited"] += 1
                return
            if tick % per_minute == 0 and tick // per_minute < len(self.minutes):
                await self.close_minute(self.minutes[tick // per_minute - 1], side, sample)
            tick += 1

    def sample(self) -> Sample:
        sample = Sample(
            time.monotonic() - self.t0,
            tree_rss_mb(self.rig.gateway.proc.pid),
            tree_rss_mb(self.rig.worker.pid),
        )
        self.samples.append(sample)
        return sample

    async def close_minute(
        self, minute: Minute, side: aiohttp.ClientSession, sample: Sample | None = None
    ) -> None:
        sample = sample or self.sample()
        minute.gateway_mb, minute.worker_mb = sample.gateway_mb, sample.worker_mb
        minute.health = await self.health(side)
        minute.closed = True
        self.on_minute(minute)

    async def health(self, side: aiohttp.ClientSession) -> dict[str, Any]:
        """The gateway's /health/detailed ({} when it does not answer: the row says so)."""
        try:
            async with side.get(f"{self.rig.gateway.url}/health/detailed") as resp:
                if resp.status != 200:
                    return {}
                found: dict[str, Any] = await resp.json()
                return found
        except (TimeoutError, aiohttp.ClientError, ValueError):
            self.run_errors["/health/detailed did not answer"] += 1
            return {}

    # After the load

    async def drain(self, side: aiohttp.ClientSession) -> float | None:
        """Seconds until every request record is in the database (None: not within DRAIN_S)."""
        start = time.monotonic()
        while time.monotonic() - start < DRAIN_S:
            health = await self.health(side)
            found = health.get("consolidation") or {}
            recorder = health.get("recorder") or {}
            if (
                found.get("queue_length") == 0
                and found.get("pending") == 0
                and recorder.get("pending") == 0
            ):
                return time.monotonic() - start
            await asyncio.sleep(0.5)
        self.run_errors[f"request records not in the database {DRAIN_S:g} s after the load"] += 1
        return None

    async def count_rows(self) -> int | None:
        try:
            return await request_rows(self.rig.database_url)
        except (SQLAlchemyError, OSError) as exc:
            self.run_errors[f"cannot count the database's rows ({type(exc).__name__})"] += 1
            return None

    def check_records(
        self, before: dict[str, Any], after: dict[str, Any], rows: int | None
    ) -> None:
        """Records lost on the way to the database are unexpected, whatever the answers:
        every request the gateway answered is one row once the backlog has drained."""

        def grew(section: str, name: str) -> int:
            old = (before.get(section) or {}).get(name) or 0
            new = (after.get(section) or {}).get(name) or 0
            return int(new) - int(old)

        for section, name, label in (
            ("recorder", "dropped", "request records dropped by the gateway"),
            ("consolidation", "trimmed", "request records trimmed from the stream"),
            ("consolidation", "dead_letters", "request records refused by the database"),
        ):
            if (lost := grew(section, name)) > 0:
                self.run_errors[label] += lost
        shipped = int((after.get("recorder") or {}).get("shipped") or 0)
        if rows is not None and self.aborted is None and rows < shipped:
            self.run_errors["request records shipped but not in the database"] += shipped - rows
