"""One cycle run's thinking for one route, without I/O: figures, findings, budgets and,
for `adaptive` routes, the bandit's weights.

The worker feeds it buckets from the database; the simulation harness feeds it buckets
from simulated traffic on a simulated clock. Both get the same decisions, so what the
simulations show is what the worker does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from app.config import Settings
from app.cycle.bandit import ArmEvidence, BanditConfig, Drift, RouteDecision, decide
from app.cycle.evidence import Bucket, Summary, merge, since, summarize
from app.cycle.monitor import (
    ERROR_BUDGET,
    Budget,
    Finding,
    adapt,
    budget_findings,
    quality_findings,
    start_budget,
)
from app.routing.config import RouteConfig


@dataclass(frozen=True, slots=True)
class RouteState:
    """What the cycle carries from run to run for a route (kept in Redis)."""

    latency: Budget = field(default_factory=Budget)
    cost: Budget = field(default_factory=Budget)
    # Deployment → when a drift was detected: its evidence before that is stale.
    resets: Mapping[str, float] = field(default_factory=dict)
    last_run_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency": self.latency.to_dict(),
            "cost": self.cost.to_dict(),
            "resets": dict(self.resets),
            "last_run_at": self.last_run_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RouteState:
        if not data:
            return cls()
        resets = data.get("resets") or {}
        last = data.get("last_run_at")
        return cls(
            latency=Budget.from_dict(data.get("latency")),
            cost=Budget.from_dict(data.get("cost")),
            resets={str(k): float(v) for k, v in resets.items()},
            last_run_at=float(last) if isinstance(last, int | float) else None,
        )


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: str
    summary: Summary
    deployments: Mapping[str, Summary]
    variants: Mapping[str, Summary]
    findings: Sequence[Finding]
    decision: RouteDecision | None
    state: RouteState

    def figures(self) -> dict[str, Any]:
        """The route's figures as a run stores them (and the status endpoint shows)."""
        return {
            **_figures(self.summary),
            "budgets": {
                "latency_ms": self.state.latency.value,
                "cost_usd": self.state.cost.value,
            },
            "deployments": {n: _figures(s) for n, s in self.deployments.items()},
            "variants": {n: _figures(s) for n, s in self.variants.items()},
            "weights": None if self.decision is None else self.decision.weights,
            "bandit": None if self.decision is None else self.decision.to_dict(),
        }


def _figures(s: Summary) -> dict[str, Any]:
    def r(x: float | None, digits: int = 4) -> float | None:
        return None if x is None or not math.isfinite(x) else round(x, digits)

    return {
        "requests": s.count,
        "quality": r(s.quality),
        "quality_variance": r(s.variance),
        "trend_per_h": r(s.trend_per_h),
        "error_rate": r(s.error_rate),
        "p95_latency_ms": r(s.p95_latency_ms, 1),
        "cost_per_request": r(s.cost_per_request, 8),
    }


@dataclass(frozen=True, slots=True)
class CycleClock:
    now: float
    interval_s: float
    half_life_s: float

    @classmethod
    def of(cls, settings: Settings, now: float) -> CycleClock:
        return cls(
            now, settings.flywheel_cycle_interval_s, settings.flywheel_cycle_half_life_h * 3600
        )


def plan_route(
    name: str,
    config: RouteConfig,
    deployments: Mapping[str, Sequence[Bucket]],
    variants: Mapping[str, Sequence[Bucket]],
    state: RouteState,
    clock: CycleClock,
    settings: Settings,
    rng: random.Random,
) -> RoutePlan:
    """This run's figures, findings and (adaptive routes) weights for one route."""
    now, half_life = clock.now, clock.half_life_s
    recent_start = state.last_run_at if state.last_run_at is not None else now - clock.interval_s
    whole = merge(*deployments.values())
    summary = summarize(whole, now, half_life)
    recent = summarize(since(whole, recent_start), now, half_life)
    latency, cost = _budgets(config, state, recent, settings.flywheel_cycle_min_observations)
    per_deployment = {n: summarize(b, now, half_life) for n, b in deployments.items()}
    findings = quality_findings(name, "*", summary, config.cycle)
    for dep, s in per_deployment.items():
        findings += budget_findings(
            name, dep, s, latency, cost, settings.flywheel_alert_min_samples
        )
    decision = None
    resets = dict(state.resets)
    if config.strategy == "adaptive" and len(config.deployments) > 1:
        decision = _bandit(
            name, config, deployments, state, clock, recent_start, latency, settings, rng
        )
        # Drops and recoveries alike: the arm's evidence starts over from the change.
        resets.update(decision.resets)
        for arm in decision.arms:
            if arm.drift is not None:
                findings.append(_drift_finding(name, arm.name, arm.drift))
    return RoutePlan(
        route=name,
        summary=summary,
        deployments=per_deployment,
        variants={n: summarize(b, now, half_life) for n, b in variants.items()},
        findings=findings,
        decision=decision,
        state=RouteState(latency, cost, resets, now),
    )


def _budgets(
    config: RouteConfig, state: RouteState, recent: Summary, min_observations: int
) -> tuple[Budget, Budget]:
    latency = start_budget(config.cycle.latency_budget_ms, state.latency)
    cost = start_budget(config.cycle.cost_budget_usd, state.cost)
    latency = adapt(latency, recent.p95_latency_ms, recent.count, min_observations)
    cost = adapt(cost, recent.cost_per_request or None, recent.count, min_observations)
    return latency, cost


def _bandit(
    name: str,
    config: RouteConfig,
    deployments: Mapping[str, Sequence[Bucket]],
    state: RouteState,
    clock: CycleClock,
    recent_start: float,
    latency: Budget,
    settings: Settings,
    rng: random.Random,
) -> RouteDecision:
    arms = [
        ArmEvidence.from_buckets(
            d.name,
            deployments.get(d.name, ()),
            now=clock.now,
            half_life_s=clock.half_life_s,
            recent_start=recent_start,
            reset_at=state.resets.get(d.name),
            configured_weight=d.weight,
        )
        for d in config.deployments
    ]
    bandit = BanditConfig.for_route(
        settings, config.cycle, latency_budget_ms=latency.value, error_rate_budget=ERROR_BUDGET
    )
    return decide(name, arms, bandit, rng)


def _drift_finding(route: str, deployment: str, drift: Drift) -> Finding:
    return Finding(
        route,
        deployment,
        "quality_drop",
        "high",
        drift.recent,
        drift.before,
        f"{route}/{deployment} quality dropped from {drift.before:.3f} to {drift.recent:.3f}"
        f" (z={drift.z:.1f})",
        asdict(drift),
    )
