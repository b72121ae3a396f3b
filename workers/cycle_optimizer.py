"""A cycle run's candidate prompts: for a route under its warning threshold, ask the
optimizer route for better system prompts and start an experiment with them.

A route gets candidates when all of these hold:
- its plan has a route-wide `quality_warning` or `quality_critical` finding;
- it has no live experiment (running, or a promotion under watch: a new split would
  starve the watch, and an experiment ending frees the route for the next run);
- fewer than `FLYWHEEL_OPTIMIZER_MAX_RUNNING` optimizer experiments are running;
- its cooldown has passed: `{prefix}cycle:optimized:{route}`, taken with SET NX EX when
  the optimizer is about to be asked, so two runs never ask twice;
- it has badly scored answers with stored bodies, from its current arm (the promoted
  variant's, or the clients' own prompt), to show the optimizer.

Learning: the cooldown grows as the route's optimizer experiments fail to produce a kept
winner (success rate of kind `experiment_optimizer`, measured when each experiment ends,
smoothed by Laplace's rule): the configured cooldown while the rate is 1/2 or better,
up to 4x as it falls towards 0. A call that yields no candidates (failed, unreadable,
no examples) shortens the cooldown to `RETRY_S`: no cause to wait hours for a retry.

The candidates inherit the current arm's sampling parameters (only the prompt is tried)
and share `FLYWHEEL_OPTIMIZER_TRAFFIC_SHARE` evenly; the control keeps the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.engine import RoutePlan
from app.cycle.optimizer import Example, example_of, optimizer_messages, parse_candidates
from app.errors import GatewayError
from app.routing.config import RoutesFile
from app.store.cycle_runs import success_rates
from app.store.experiments import (
    BASELINE,
    LIVE,
    create_experiment,
    create_variant,
    list_experiments,
    promoted_variant,
)
from app.store.schema import RequestBody, RequestRow
from app.store.variant_plans import publish_route
from workers.llm_calls import OPTIMIZER_TAG, LLMAnswer, LLMCalls, redactors_for

if TYPE_CHECKING:
    from workers.cycle_run import RunLog

log = logging.getLogger("flywheel.cycle.optimizer")

ORIGIN = "optimizer"
KIND = f"experiment_{ORIGIN}"  # the measured end of its experiments (cycle_experiments)
UNDER_WARNING = ("quality_warning", "quality_critical")
WORST_EXAMPLES = 5
BUDGET_S = 150.0  # the optimizer's share of a run, across routes
MIN_CALL_S = 5.0
RETRY_S = 900.0
MIN_RATE_FACTOR = 0.25  # the cooldown grows at most 4x


def cooldown_key(prefix: str, route: str) -> str:
    return f"{prefix}cycle:optimized:{route}"


def cooldown_s(base_s: float, wins: int, measured: int) -> float:
    """The route's cooldown after its optimizer experiments won `wins` of `measured`."""
    rate = (wins + 1) / (measured + 2)
    return base_s / min(1.0, max(MIN_RATE_FACTOR, 2 * rate))


def under_warning(plan: RoutePlan) -> bool:
    return any(f.kind in UNDER_WARNING and f.subject == "*" for f in plan.findings)


class Optimizer:
    def __init__(
        self,
        settings: Settings,
        routes: RoutesFile,
        engine: AsyncEngine,
        redis: Redis,
        llm: LLMCalls | None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.engine = engine
        self.redis = redis
        self.llm = llm
        self.route = settings.flywheel_optimizer_route
        self.redactors = redactors_for(settings, routes)

    async def step(self, log_: RunLog, plans: Sequence[RoutePlan]) -> None:
        if self.llm is None or self.route is None or not self.llm.knows(self.route):
            return
        due = [p for p in plans if under_warning(p)]
        if not due:
            return
        live = await list_experiments(self.engine, statuses=LIVE, limit=500)
        busy = {e["route"] for e in live}
        running = sum(1 for e in live if e["status"] == "running" and e["origin"] == ORIGIN)
        rates = await success_rates(self.engine)
        deadline = time.monotonic() + BUDGET_S
        for plan in due:
            if plan.route in busy:
                _note(log_, plan.route, "experiment_live")
            elif running >= self.settings.flywheel_optimizer_max_running:
                _note(log_, plan.route, "max_running")
            elif deadline - time.monotonic() < MIN_CALL_S:
                _note(log_, plan.route, "no_time")
            else:
                wins, measured = rates.get((plan.route, KIND), (0, 0))
                left = deadline - time.monotonic()
                if await self._optimize(plan, wins, measured, left, log_):
                    running += 1

    async def _optimize(
        self, plan: RoutePlan, wins: int, measured: int, left_s: float, log_: RunLog
    ) -> bool:
        """Ask for candidates and start their experiment; whether it started."""
        route = plan.route
        wait = cooldown_s(self.settings.flywheel_optimizer_cooldown_s, wins, measured)
        key = cooldown_key(self.settings.flywheel_redis_prefix, route)
        if wait > 0 and not await self.redis.set(key, log_.run_id, nx=True, ex=math.ceil(wait)):
            _note(log_, route, "cooldown")
            return False
        promoted = await promoted_variant(self.engine, route)
        current = promoted["system_prompt"] if promoted else None
        examples = await self._examples(route, promoted, log_.now)
        if not examples:
            return await self._retry_soon(key, wait, log_, route, "no_examples")
        k = self.settings.flywheel_optimizer_candidates
        assert self.llm is not None
        assert self.route is not None
        try:
            answer = await self.llm.complete(
                self.route,
                optimizer_messages(current, examples, k),
                tag=OPTIMIZER_TAG,
                timeout_s=left_s,
            )
        except GatewayError as e:
            log.warning("optimizer call for route %s failed: %s", route, e.message)
            return await self._retry_soon(key, wait, log_, route, "failed")
        candidates = parse_candidates(answer.text, k, current=current)
        log.info(
            "optimizer for route %s: %d candidates, $%.6f", route, len(candidates), answer.cost
        )
        if not candidates:
            return await self._retry_soon(key, wait, log_, route, "no_candidates", answer)
        exp = await self._start(route, promoted, candidates, log_.now)
        await publish_route(self.engine, self.redis, self.settings.flywheel_redis_prefix, route)
        stats = {
            "experiment": exp["id"],
            "variants": [v for v in exp["arms"] if v != exp["control"]],
            "control": exp["control"],
            "traffic_share": self.settings.flywheel_optimizer_traffic_share,
            "examples": len(examples),
            "quality": plan.summary.quality,
            "cooldown_s": round(wait),
            "success": [wins, measured],
            "optimizer": _call_facts(answer),
        }
        log_.act(route, "candidates", exp["id"], stats)
        _note(log_, route, "started", experiment=exp["id"])
        return True

    async def _examples(
        self, route: str, promoted: dict[str, Any] | None, now: datetime
    ) -> list[Example]:
        """The route's worst-scored recent answers from its current arm, with bodies,
        redacted with the route's redactor."""
        r, b = RequestRow, RequestBody
        arm = (
            r.variant == promoted["id"]
            if promoted
            else or_(r.variant.is_(None), r.variant == BASELINE)
        )
        lo = now - timedelta(hours=self.settings.flywheel_cycle_window_h)
        q = (
            select(r.quality_score, r.quality_reasons, b.request, b.response)
            .join(b, b.request_id == r.id)
            .where(
                r.route == route,
                r.created_at >= lo,
                r.created_at < now,
                r.status == 200,
                r.quality_score < self.routes.routes[route].cycle.target,
                arm,
                b.request.is_not(None),
            )
            .order_by(r.quality_score.asc(), r.created_at.desc())
            .limit(WORST_EXAMPLES * 2)  # some may not read as exchanges
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        redact = self.redactors.of(route).text
        out: list[Example] = []
        for score, reasons, request, response in rows:
            try:
                req, resp = orjson.loads(request or "null"), orjson.loads(response or "null")
            except orjson.JSONDecodeError:
                continue
            example = example_of(req, resp, float(score or 0.0), reasons, redact)
            if example is not None:
                out.append(example)
        return out[:WORST_EXAMPLES]

    async def _start(
        self, route: str, promoted: dict[str, Any] | None, prompts: list[str], now: datetime
    ) -> dict[str, Any]:
        parent = promoted["id"] if promoted else None
        params = (promoted["params"] if promoted else None) or {}
        ids = []
        for i, prompt in enumerate(prompts, 1):
            variant = await create_variant(
                self.engine,
                now,
                route=route,
                name=f"{ORIGIN}-{now:%Y%m%d%H%M}-{i}",
                system_prompt=prompt,
                params=params,
                source=ORIGIN,
                parent=parent,
            )
            ids.append(variant["id"])
        control = parent or BASELINE
        share = self.settings.flywheel_optimizer_traffic_share
        arms = {control: 1.0 - share} | dict.fromkeys(ids, share / len(ids))
        return await create_experiment(
            self.engine, now, route=route, control=control, arms=arms, origin=ORIGIN
        )

    async def _retry_soon(
        self,
        key: str,
        wait: float,
        log_: RunLog,
        route: str,
        status: str,
        answer: LLMAnswer | None = None,
    ) -> bool:
        """Nothing started: the route may be tried again after `RETRY_S`, not a full
        cooldown (a failed call or an unreadable reply says nothing of the route)."""
        if wait > 0:
            await self.redis.expire(key, math.ceil(min(RETRY_S, wait)))
        facts = {} if answer is None else {"optimizer": _call_facts(answer)}
        _note(log_, route, status, **facts)
        return False


def _call_facts(answer: LLMAnswer) -> dict[str, Any]:
    return {"route": answer.route, "deployment": answer.deployment, "cost": answer.cost}


def _note(log_: RunLog, route: str, status: str, **facts: Any) -> None:
    """Why the route got candidates or not, in the run's figures for the route."""
    log_.routes.setdefault(route, {})["optimizer"] = {"status": status, **facts}
