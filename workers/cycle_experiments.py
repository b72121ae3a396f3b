"""A cycle run's look at the prompt experiments: decide the running ones, watch the
promoted ones, and store every decision with its statistics.

Arms are judged on their answers since the experiment started (a watch: since the
promotion), undecayed, as `app.cycle.experiment` expects. The decisions (promote,
retire, inconclusive, rollback, keep) change the experiment's and the variants' rows;
the caller republishes the route's plan afterwards. An experiment's end is also the
measured outcome of having run it (success: its winner was kept), which the cycle's
success rates count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.cycle.evidence import EMPTY, Bucket, Summary, summarize
from app.cycle.experiment import ExperimentPolicy, Verdict, WatchVerdict, decide, watch
from app.cycle.sequential import Arm
from app.store.cycle_evidence import by_variant, load_buckets
from app.store.cycle_runs import decision, settle
from app.store.experiments import LIVE, list_experiments, set_variant_status, update_experiment
from app.store.metrics_history import as_utc

if TYPE_CHECKING:
    from workers.cycle_run import RunLog

BUCKET_S = 300


class Experiments:
    def __init__(self, settings: Settings, engine: AsyncEngine, redis: Redis) -> None:
        self.engine = engine
        self.redis = redis
        self.policy = ExperimentPolicy.from_settings(settings)
        self.window = timedelta(hours=settings.flywheel_cycle_window_h)

    async def step(self, log_: RunLog, routes: Sequence[str]) -> None:
        for exp in await list_experiments(self.engine, statuses=LIVE, limit=500):
            if exp["route"] not in routes:
                continue
            if exp["status"] == "running":
                await self._decide(exp, log_)
            else:
                await self._watch(exp, log_)

    async def _arms(self, route: str, since: datetime, now: datetime) -> dict[str, list[Bucket]]:
        arms = await load_buckets(self.engine, since, now, BUCKET_S, [route])
        return by_variant(arms, route)

    async def _decide(self, exp: dict[str, Any], log_: RunLog) -> None:
        started = as_utc(datetime.fromisoformat(exp["started_at"]))
        buckets = await self._arms(exp["route"], started, log_.now)
        now = log_.now.timestamp()
        stats = {v: _summary(buckets.get(v), now) for v in exp["arms"]}
        control = exp["control"]
        tested = {v: s for v, s in stats.items() if v != control}
        family = int((exp["decision"] or {}).get("family_size") or len(tested))
        found = decide(stats[control], tested, self.policy, family_size=family)
        facts = found.to_dict()
        log_.routes.setdefault(exp["route"], {}).setdefault("experiments", {})[exp["id"]] = facts
        if found.winner is not None:
            baseline = await self._baseline(exp["route"], control, started, log_.now)
            await self._promote(exp, found.winner, baseline, facts, log_)
            return
        dropped = [c.variant for c in found.comparisons if c.verdict is not Verdict.CONTINUE]
        if not dropped:
            await update_experiment(self.engine, exp["id"], decision=facts)
            return
        await set_variant_status(self.engine, dropped, "retired", log_.now)
        left = {v: share for v, share in exp["arms"].items() if v not in dropped}
        if len(left) > 1:  # the others go on; the control takes the freed share
            left[control] += sum(exp["arms"][v] for v in dropped)
            await update_experiment(self.engine, exp["id"], arms=left, decision=facts)
            log_.act(exp["route"], "retire", ",".join(dropped), {"experiment": exp["id"]})
            return
        verdicts = {c.verdict for c in found.comparisons}
        status = "inconclusive" if Verdict.INCONCLUSIVE in verdicts else "retired"
        await update_experiment(
            self.engine,
            exp["id"],
            status=status,
            decided_at=log_.now,
            ended_at=log_.now,
            decision=facts,
        )
        log_.act(exp["route"], status, exp["id"], {"experiment": exp["id"], "decision": facts})
        await self._outcome(log_, exp, "failure", {"ended": status})

    async def _baseline(self, route: str, control: str, started: datetime, now: datetime) -> Arm:
        """The old baseline the promoted variant is watched against: the control's
        answers over the cycle window before the experiment as well as during it. Its
        experiment arm alone is biased low (an experiment stops early on a control that
        happened to look low) and short; pooled, the watch catches regressions it
        otherwise misses (simulated: 8-point regressions rolled back 100% vs 91%)."""
        lo = min(started, now - self.window)
        arms = by_variant(await load_buckets(self.engine, lo, now, BUCKET_S, [route]), route)
        return Arm.from_buckets(arms.get(control, []))

    async def _promote(
        self, exp: dict[str, Any], winner: str, baseline: Arm, facts: dict[str, Any], log_: RunLog
    ) -> None:
        others = [v for v in exp["arms"] if v != winner]
        await set_variant_status(self.engine, others, "retired", log_.now)
        await set_variant_status(self.engine, [winner], "promoted", log_.now)
        await update_experiment(
            self.engine,
            exp["id"],
            status="watching",
            winner=winner,
            decided_at=log_.now,
            decision=facts,
            watch={"baseline": baseline.to_dict(), "promoted_at": log_.now.isoformat()},
        )
        log_.act(exp["route"], "promote", winner, {"experiment": exp["id"], "decision": facts})

    async def _watch(self, exp: dict[str, Any], log_: RunLog) -> None:
        w = exp["watch"] or {}
        winner = exp["winner"]
        promoted_at = as_utc(datetime.fromisoformat(w["promoted_at"]))
        assert winner is not None
        buckets = await self._arms(exp["route"], promoted_at, log_.now)
        now = log_.now.timestamp()
        found = watch(_summary(buckets.get(winner), now), Arm.from_dict(w["baseline"]), self.policy)
        facts = found.to_dict()
        log_.routes.setdefault(exp["route"], {}).setdefault("experiments", {})[exp["id"]] = facts
        if found.verdict is WatchVerdict.WATCH:
            return
        control = exp["control"]
        if found.verdict is WatchVerdict.ROLLBACK:
            await set_variant_status(self.engine, [winner], "rolled_back", log_.now)
            await set_variant_status(self.engine, [control], "promoted", log_.now)
            status, kind, outcome = "rolled_back", "rollback", "failure"
        else:
            status, kind, outcome = "kept", "keep", "success"
        await update_experiment(
            self.engine, exp["id"], status=status, ended_at=log_.now, watch={**w, "last": facts}
        )
        log_.act(exp["route"], kind, winner, {"experiment": exp["id"], "watch": facts})
        await self._outcome(log_, exp, outcome, {"ended": status})

    async def _outcome(
        self, log_: RunLog, exp: dict[str, Any], outcome: str, stats: dict[str, Any]
    ) -> None:
        """The experiment as one measured action of its origin's kind; it also settles
        the promotion it watched and the candidates it tested."""
        if exp["winner"] is not None:
            await settle(
                self.engine, exp["route"], "promote", exp["winner"], outcome, stats, log_.now
            )
        await settle(self.engine, exp["route"], "candidates", exp["id"], outcome, stats, log_.now)
        row = decision(
            log_.run_id, log_.now, exp["route"], f"experiment_{exp['origin']}", exp["id"], None
        )
        row |= {"outcome": outcome, "outcome_stats": stats, "measured_at": log_.now}
        log_.decisions.append(row)
        log_.outcomes.append(
            {"experiment": exp["id"], "route": exp["route"], "outcome": outcome} | stats
        )


def _summary(buckets: list[Bucket] | None, now: float) -> Summary:
    return summarize(buckets, now, math.inf) if buckets else EMPTY
