"""The monitor: a route's figures against its thresholds and budgets, as findings.

Quality is held to the route's thresholds (critical 0.85, warning 0.90, target 0.95 by
default); each deployment to the route's latency, cost and error budgets. The latency
and cost budgets adapt from what is observed, within bounds:

- a p95 under the budget but within 10% of it loosens the budget (the route's normal
  sits at the edge: left alone, ordinary variation would read as violations);
- a p95 over the budget by at most 10% tightens it (a small overrun is how drift starts,
  and the bar is not lowered to meet it: the guardrail bites sooner);
- a p95 far from the budget either way leaves it: far under is headroom, far over is an
  incident for the guardrails and alerts, not a new normal;
- at most ±10% per adjustment, only after `min_observations` requests since the last,
  and never outside [0.5, 2] x the budget it started from, so it cannot run away.

A route with no budget configured learns one from its first observations (1.5 x p95).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from app.cycle.evidence import Summary
from app.routing.config import CycleConfig

Severity = Literal["critical", "high", "medium", "info"]
STEP = 0.10  # the most a budget moves per adjustment
NEAR = 0.10  # "near" and "just over" the budget: within this share of it
RANGE = (0.5, 2.0)  # bounds on a budget, as a multiple of the one it started from
LEARN_FACTOR = 1.5
ERROR_BUDGET = 0.05  # share of a deployment's answers that may fail
MIN_SCORED = 20  # effective scores before quality is judged against thresholds
TREND_PER_H = -0.01  # a slope steeper than this, under target, is a finding


@dataclass(frozen=True, slots=True)
class Finding:
    route: str
    subject: str  # "*" (the route), a deployment, or "variant:<id>"
    kind: str
    severity: Severity
    value: float
    threshold: float | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Budget:
    """A learned budget: its value, where it started, and the observations counted
    towards the next adjustment."""

    value: float | None = None
    origin: float | None = None
    pending: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Budget:
        if not data:
            return cls()
        return cls(
            value=_num(data.get("value")),
            origin=_num(data.get("origin")),
            pending=int(data.get("pending") or 0),
        )


def _num(x: object) -> float | None:
    if isinstance(x, int | float) and math.isfinite(x) and x > 0:
        return float(x)
    return None


def start_budget(configured: float | None, learned: Budget) -> Budget:
    """The learned budget, reset when the operator changed the configured one."""
    if configured is not None and learned.origin != configured:
        return Budget(value=configured, origin=configured)
    return learned


def adapt(budget: Budget, observed: float | None, new: int, min_observations: int) -> Budget:
    """The budget after `new` more observations whose p95 is `observed`."""
    b = replace(budget, pending=budget.pending + new)
    if observed is None or observed <= 0 or b.pending < min_observations:
        return b
    if b.value is None:
        learned = observed * LEARN_FACTOR
        return Budget(value=learned, origin=learned)
    ratio = observed / b.value
    if 1.0 - NEAR <= ratio <= 1.0:
        factor = 1.0 + STEP
    elif 1.0 < ratio <= 1.0 + NEAR:
        factor = 1.0 - STEP
    else:
        return replace(b, pending=0)
    origin = b.origin or b.value
    value = min(max(b.value * factor, origin * RANGE[0]), origin * RANGE[1])
    return Budget(value=value, origin=origin)


def quality_findings(route: str, subject: str, s: Summary, cfg: CycleConfig) -> list[Finding]:
    """Quality against the thresholds, and a falling trend while under target."""
    if s.quality is None or s.n_scored < MIN_SCORED:
        return []
    q = s.quality
    facts = {"n": round(s.n_scored, 1), "trend_per_h": round(s.trend_per_h, 4)}
    out: list[Finding] = []
    if q < cfg.critical:
        out.append(_q(route, subject, "quality_critical", "critical", q, cfg.critical, facts))
    elif q < cfg.warning:
        out.append(_q(route, subject, "quality_warning", "high", q, cfg.warning, facts))
    elif q < cfg.target:
        out.append(_q(route, subject, "below_target", "info", q, cfg.target, facts))
    if q < cfg.target and s.trend_per_h < TREND_PER_H:
        out.append(
            Finding(
                route,
                subject,
                "quality_trend",
                "medium",
                s.trend_per_h,
                TREND_PER_H,
                f"quality falling {-s.trend_per_h:.3f}/h (now {q:.3f})",
                facts,
            )
        )
    return out


def _q(
    route: str,
    subject: str,
    kind: str,
    severity: Severity,
    q: float,
    threshold: float,
    facts: dict[str, Any],
) -> Finding:
    who = route if subject == "*" else f"{route}/{subject}"
    return Finding(
        route, subject, kind, severity, q, threshold, f"{who} quality {q:.3f} < {threshold}", facts
    )


def budget_findings(
    route: str, deployment: str, s: Summary, latency: Budget, cost: Budget, min_count: int
) -> list[Finding]:
    """A deployment over its latency, cost or error budget (the bandit's guardrails)."""
    if s.count < min_count:
        return []
    out: list[Finding] = []
    who = f"{route}/{deployment}"
    p95 = s.p95_latency_ms
    if latency.value is not None and p95 is not None and p95 > latency.value:
        out.append(
            Finding(
                route,
                deployment,
                "latency_budget",
                "high",
                p95,
                latency.value,
                f"{who} p95 {p95:.0f} ms over its budget {latency.value:.0f} ms",
            )
        )
    if cost.value is not None and s.cost_per_request > cost.value:
        out.append(
            Finding(
                route,
                deployment,
                "cost_budget",
                "medium",
                s.cost_per_request,
                cost.value,
                f"{who} ${s.cost_per_request:.5f}/request over its budget ${cost.value:.5f}",
            )
        )
    if s.error_rate > ERROR_BUDGET:
        out.append(
            Finding(
                route,
                deployment,
                "error_budget",
                "high",
                s.error_rate,
                ERROR_BUDGET,
                f"{who} error rate {s.error_rate:.1%} over its budget {ERROR_BUDGET:.0%}",
            )
        )
    return out
