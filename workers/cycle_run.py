"""One run of the virtuous cycle, in a worker.

Load the window's evidence from the database, let `app.cycle.engine` plan each route,
then act: publish the adaptive routes' weights to Redis (every gateway picks them up
within seconds), raise the findings that deserve it as alerts, decide the experiments,
start candidate-prompt experiments where quality is under warning (`cycle_optimizer`),
republish every route's variant plan, measure what earlier decisions achieved, and
have the LLM judge score a sample of recent answers for the next run (`cycle_judge`).
The run is stored with its figures, findings, actions and outcomes.

Redis or the database failing mid-run fails the run (recorded as failed when the
database still answers); the next run starts from what is stored, so nothing is lost
but time.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.engine import CycleClock, RoutePlan, RouteState, plan_route
from app.cycle.evidence import Bucket, since, summarize
from app.cycle.monitor import Finding
from app.observability.anomaly import KINDS, Candidate
from app.routing.config import RoutesFile
from app.routing.weights import weights_key
from app.store.cycle_evidence import (
    ArmKey,
    by_deployment,
    by_route,
    by_variant,
    load_buckets,
)
from app.store.cycle_runs import (
    add_decisions,
    decision,
    finish_run,
    new_id,
    pending_decisions,
    set_outcome,
    start_run,
)
from app.store.experiments import BASELINE, promoted_ids
from app.store.variant_plans import publish_route
from workers.cycle_experiments import Experiments
from workers.cycle_judge import Judge
from workers.cycle_optimizer import Optimizer
from workers.llm_calls import LLMCalls
from workers.tasks.alerts import AlertLoop

log = logging.getLogger("flywheel.cycle")

BUCKET_S = 300
ALERT_SEVERITIES = ("critical", "high")
REWEIGHT_MIN_CHANGE = 0.05  # a reweighting smaller than this is not a decision
OUTCOME_MIN_SCORES = 30  # scores since a decision before its outcome is judged
OUTCOME_TOLERANCE = 0.01  # quality may wobble this much and still count as held
FINAL = frozenset({"retire", "retired", "inconclusive", "rollback", "keep"})


def state_key(prefix: str) -> str:
    return f"{prefix}cycle:state"


@dataclass
class RunLog:
    run_id: str
    now: datetime
    routes: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def act(self, route: str, kind: str, subject: str | None, stats: dict[str, Any]) -> None:
        self.actions.append({"route": route, "kind": kind, "subject": subject, **stats})
        # Ends of experiments are outcomes themselves, not actions awaiting one.
        outcome = "n/a" if kind in FINAL else "pending"
        self.decisions.append(decision(self.run_id, self.now, route, kind, subject, stats, outcome))


class CycleRunner:
    def __init__(
        self,
        settings: Settings,
        routes: RoutesFile,
        redis: Redis,
        engine: AsyncEngine,
        alerts: AlertLoop | None,
        rng: random.Random | None = None,
        llm: LLMCalls | None = None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.redis = redis
        self.engine = engine
        self.alerts = alerts
        self.prefix = settings.flywheel_redis_prefix
        self.rng = rng or random.Random()
        self.llm = llm  # the judge's and the optimizer's calls; None: neither configured

    async def run(self, trigger: str, job_id: str | None) -> dict[str, Any]:
        now = datetime.now(UTC)
        log_ = RunLog(new_id("run"), now)
        await start_run(self.engine, log_.run_id, now, trigger, job_id)
        try:
            await self._steps(log_)
        except BaseException as e:
            await self._finish(log_, "failed", type(e).__name__)
            raise
        await add_decisions(self.engine, log_.decisions)
        await self._finish(log_, "completed")
        log.info(
            "cycle run %s: %d routes, %d findings, %d actions, %d outcomes",
            log_.run_id,
            len(log_.routes),
            len(log_.findings),
            len(log_.actions),
            len(log_.outcomes),
        )
        return {
            "run_id": log_.run_id,
            "findings": len(log_.findings),
            "actions": len(log_.actions),
            "outcomes": len(log_.outcomes),
        }

    async def _finish(self, log_: RunLog, status: str, error: str | None = None) -> None:
        await finish_run(
            self.engine,
            log_.run_id,
            datetime.now(UTC),
            status=status,
            routes=log_.routes,
            findings=log_.findings,
            actions=log_.actions,
            outcomes=log_.outcomes,
            error=error,
        )

    async def _steps(self, log_: RunLog) -> None:
        s = self.settings
        names = [n for n, r in self.routes.routes.items() if r.ensemble is None]
        lo = log_.now - timedelta(hours=s.flywheel_cycle_window_h)
        arms = await load_buckets(self.engine, lo, log_.now, BUCKET_S, names)
        # Deployments are judged on the route's own prompt only: answers a candidate
        # variant produced (under test, or retired since) say how good the variant is,
        # not the deployment, and would drag down whichever deployment served them.
        promoted = await promoted_ids(self.engine)
        current = {
            k: b for k, b in arms.items() if k.variant in (None, BASELINE, promoted.get(k.route))
        }
        states = await self._states()
        clock = CycleClock.of(s, log_.now.timestamp())
        plans: list[RoutePlan] = []
        for name in names:
            plan = plan_route(
                name,
                self.routes.routes[name],
                by_deployment(current, name),
                by_variant(arms, name),
                states.get(name, RouteState()),
                clock,
                s,
                self.rng,
            )
            plans.append(plan)
            log_.routes[name] = plan.figures()
            log_.findings += [f.to_dict() for f in plan.findings]
            await self._reweight(plan, states.get(name), log_)
        await self._save_states({p.route: p.state for p in plans})
        await self._raise([f for p in plans for f in p.findings], log_.now)
        await Experiments(self.settings, self.engine, self.redis).step(log_, names)
        await Optimizer(s, self.routes, self.engine, self.redis, self.llm).step(log_, plans)
        for name in names:  # heals a Redis that lost the plans
            await publish_route(self.engine, self.redis, self.prefix, name)
        await self._measure(log_, arms)
        await Judge(s, self.routes, self.engine, self.llm).step(log_)

    async def _states(self) -> dict[str, RouteState]:
        raw = await cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(state_key(self.prefix)))
        out: dict[str, RouteState] = {}
        for route, value in raw.items():
            try:
                out[route.decode()] = RouteState.from_dict(orjson.loads(value))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.warning("cycle state of route %s unreadable: starting afresh", route)
        return out

    async def _save_states(self, states: Mapping[str, RouteState]) -> None:
        if states:
            mapping = {k: orjson.dumps(v.to_dict()) for k, v in states.items()}
            await cast(Awaitable[int], self.redis.hset(state_key(self.prefix), mapping=mapping))

    async def _reweight(self, plan: RoutePlan, before: RouteState | None, log_: RunLog) -> None:
        """Publish an adaptive route's weights; a material change is a decision."""
        if plan.decision is None:
            return
        weights = plan.decision.weights
        key = weights_key(self.prefix, plan.route)
        old = await cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(key))
        previous = {k.decode(): float(v) for k, v in old.items()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={k: f"{v:.6f}" for k, v in weights.items()})
            await pipe.execute()
        change = max((abs(w - previous.get(n, 0.0)) for n, w in weights.items()), default=0.0)
        if change >= REWEIGHT_MIN_CHANGE or plan.decision.drifted:
            log_.act(
                plan.route,
                "reweight",
                plan.decision.best,
                {
                    "weights": {n: round(w, 4) for n, w in weights.items()},
                    "previous": {n: round(w, 4) for n, w in previous.items()},
                    "quality": plan.summary.quality,
                    "drifted": plan.decision.drifted,
                },
            )

    async def _raise(self, findings: list[Finding], now: datetime) -> None:
        if self.alerts is None:
            return
        candidates = [_candidate(f) for f in findings if f.severity in ALERT_SEVERITIES]
        await self.alerts.raise_all([c for c in candidates if c is not None], now)

    async def _measure(self, log_: RunLog, arms: Mapping[ArmKey, list[Bucket]]) -> None:
        """The outcome of earlier reweightings: did the route's quality hold since? Read
        from this run's evidence (whole buckets started since the decision)."""
        settle = log_.now - timedelta(seconds=self.settings.flywheel_cycle_interval_s)
        routes = by_route(arms)
        # Only reweightings: experiments settle their decisions as they end.
        for d in await pending_decisions(self.engine, settle, "reweight"):
            before = d["stats"].get("quality")
            buckets = since(routes.get(d["route"], []), d["created_at"].timestamp())
            after = summarize(buckets, log_.now.timestamp(), math.inf)
            if before is None or after.quality is None or after.n_scored < OUTCOME_MIN_SCORES:
                continue
            ok = after.quality >= before - OUTCOME_TOLERANCE
            stats = {"quality_before": before, "quality_after": after.quality, "n": after.n_scored}
            outcome = "success" if ok else "failure"
            await set_outcome(self.engine, d["id"], outcome, stats, log_.now)
            log_.outcomes.append(
                {"decision": d["id"], "route": d["route"], "kind": d["kind"], "outcome": outcome}
                | stats
            )


def _candidate(f: Finding) -> Candidate | None:
    if f.kind not in KINDS:
        return None
    return Candidate(
        route=f.route,
        deployment=f.subject,
        kind=f.kind,  # checked against KINDS above
        severity=f.severity if f.severity != "info" else "low",
        z=float(f.details.get("z", 0.0)) if isinstance(f.details.get("z"), float) else 0.0,
        value=f.value,
        baseline=f.threshold if f.threshold is not None else 0.0,
        health=None,
        message=f.message,
        details={"source": "cycle", **f.details},
    )
