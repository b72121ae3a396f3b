"""A cycle run's LLM judge: a sample of recent answers scored through the judge route.

Which answers: those with stored bodies (the judge reads the exchange; routes keep
bodies only when they opt in), answered (status 200), still scored by the rules alone,
of the routes the worker knows except the judge route itself, created since the last
run started (less one interval: rows reach the database a little after their request,
and rows already judged no longer qualify, so the overlap judges nothing twice).

The sample is `FLYWHEEL_JUDGE_SAMPLE` of them, chosen by a hash of the request id: the
same rows whoever looks, and a row passed over once is passed over every time, so the
overlap does not bias the sample. At most `MAX_PER_RUN` (the newest) per run, a few at a
time, all within `BUDGET_S`, so judging can neither crowd the worker nor stall the run.
The score goes in through `set_judge_score` (feedback > judge > rules); the run records
per route how many were sampled, scored, unreadable or failed, and what they cost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.judge import judge_messages, parse_verdict
from app.errors import GatewayError
from app.observability.redact import Redactor
from app.routing.config import RoutesFile
from app.store.cycle_runs import last_run
from app.store.metrics_history import as_utc
from app.store.quality import RULES, set_judge_score
from app.store.schema import RequestBody, RequestRow
from workers.llm_calls import JUDGE_TAG, LLMCalls, redactors_for

if TYPE_CHECKING:
    from workers.cycle_run import RunLog

log = logging.getLogger("flywheel.cycle.judge")

MAX_PER_RUN = 50
CONCURRENCY = 8
BUDGET_S = 60.0  # the judge's share of a run (the job's timeout is 300 s)
GRACE_S = 5.0  # for calls cut at the budget to return
MIN_CALL_S = 1.0  # less time than this left: the call is not started
SCAN_LIMIT = 20_000  # candidate rows looked at per run, newest first


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request is in the judge's sample: a stable hash, not a coin, so every
    worker and every run picks the same requests."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


@dataclass(slots=True)
class Tally:
    sampled: int = 0
    scored: int = 0
    kept: int = 0  # feedback decided the row meanwhile: the judge's score not taken
    unreadable: int = 0  # the judge's reply had no score
    skipped: int = 0  # nothing to judge in the bodies, or no time left
    failed: int = 0  # the judge route did not answer
    cost: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"cost": round(self.cost, 8)}


@dataclass(frozen=True, slots=True)
class Pick:
    request_id: str
    route: str
    request: str | None
    response: str | None


class Judge:
    def __init__(
        self, settings: Settings, routes: RoutesFile, engine: AsyncEngine, llm: LLMCalls | None
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.engine = engine
        self.llm = llm
        self.route = settings.flywheel_judge_route
        self.redactors = redactors_for(settings, routes)

    async def step(self, log_: RunLog) -> None:
        s = self.settings
        if self.llm is None or self.route is None or not self.llm.knows(self.route):
            return
        if s.flywheel_judge_sample <= 0:
            return
        judged = [n for n in self.routes.routes if n != self.route]
        lo = await self._since(log_.now)
        picks = await pick(self.engine, lo, log_.now, judged, s.flywheel_judge_sample)
        if not picks:
            return
        tallies = await self._judge_all(picks)
        for route, tally in tallies.items():
            log_.routes.setdefault(route, {})["judge"] = tally.to_dict()
        every = tallies.values()
        log.info(
            "judge: %d sampled, %d scored, %d unreadable, %d failed, $%.6f",
            sum(t.sampled for t in every),
            sum(t.scored for t in every),
            sum(t.unreadable for t in every),
            sum(t.failed for t in every),
            sum(t.cost for t in every),
        )

    async def _since(self, now: datetime) -> datetime:
        interval = timedelta(seconds=self.settings.flywheel_cycle_interval_s)
        lo = now - interval
        prev = await last_run(self.engine, "completed")
        if prev is not None and prev["started_at"] is not None:
            started = as_utc(datetime.fromisoformat(prev["started_at"]))
            assert started is not None
            lo = min(lo, started - interval)
        return max(lo, now - timedelta(hours=self.settings.flywheel_cycle_window_h))

    async def _judge_all(self, picks: Sequence[Pick]) -> dict[str, Tally]:
        tallies = {p.route: Tally() for p in picks}
        gate = asyncio.Semaphore(CONCURRENCY)
        deadline = time.monotonic() + BUDGET_S
        tasks = [asyncio.create_task(self._one(p, tallies[p.route], gate, deadline)) for p in picks]
        try:
            done, _ = await asyncio.wait(tasks, timeout=BUDGET_S + GRACE_S)
        finally:  # past the budget, or the run itself cancelled: no call outlives the step
            late = [t for t in tasks if not t.done()]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error  # the database failing: the run fails, as for every step
        return tallies

    async def _one(self, p: Pick, tally: Tally, gate: asyncio.Semaphore, deadline: float) -> None:
        tally.sampled += 1
        async with gate:
            left = deadline - time.monotonic()
            messages = _messages(p, self.redactors.of(p.route))
            if messages is None or left < MIN_CALL_S:
                tally.skipped += 1
                return
            assert self.llm is not None
            assert self.route is not None
            try:
                answer = await self.llm.complete(
                    self.route, messages, tag=JUDGE_TAG, timeout_s=left
                )
            except GatewayError as e:
                tally.failed += 1
                log.debug("judge call for %s failed: %s", p.request_id, e.message)
                return
            tally.cost += answer.cost
            verdict = parse_verdict(answer.text)
            if verdict is None:
                tally.unreadable += 1
                return
            # One reason, as the rules give theirs: "judge: <why>" reads on its own.
            reasons = [f"judge: {verdict.reason}" if verdict.reason else "judge"]
            if await set_judge_score(self.engine, p.request_id, verdict.score, reasons):
                tally.scored += 1
            else:
                tally.kept += 1


def _messages(p: Pick, redactor: Redactor) -> list[dict[str, str]] | None:
    """The judge's messages for a pick; None for bodies that do not read as JSON.
    Stored bodies were redacted on the way in; masking again (with the route's
    redactor) costs little on the clipped text and covers bodies kept before a
    route's `redact:` list grew."""
    try:
        request = orjson.loads(p.request or "null")
        response = orjson.loads(p.response or "null")
    except orjson.JSONDecodeError:
        return None
    return judge_messages(request, response, redactor.text)


async def pick(
    engine: AsyncEngine,
    lo: datetime,
    hi: datetime,
    routes: Sequence[str],
    rate: float,
    limit: int = MAX_PER_RUN,
) -> list[Pick]:
    """The sampled rows to judge, newest first, with their bodies."""
    if not routes:
        return []
    r, b = RequestRow, RequestBody
    q = (
        select(r.id, r.route)
        .join(b, b.request_id == r.id)
        .where(
            r.created_at >= lo,
            r.created_at < hi,
            r.route.in_(list(routes)),
            r.quality_source == RULES,
            r.status == 200,
            b.request.is_not(None),
            b.response.is_not(None),
        )
        .order_by(r.created_at.desc())
        .limit(SCAN_LIMIT)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
        chosen = [(str(rid), str(route)) for rid, route in rows if sampled(str(rid), rate)]
        chosen = chosen[:limit]
        if not chosen:
            return []
        found = await conn.execute(
            select(b.request_id, b.request, b.response).where(
                b.request_id.in_([rid for rid, _ in chosen])
            )
        )
        bodies = {str(rid): (req, resp) for rid, req, resp in found.all()}
    return [Pick(rid, route, *bodies[rid]) for rid, route in chosen if rid in bodies]
