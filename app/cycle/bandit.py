"""Adaptive routing: a cost-aware Thompson-sampling bandit over a route's deployments.

Reward = quality - cost per request / cost sensitivity - latency penalty. Each arm's
mean reward gets a Gaussian posterior from its decayed evidence (a weak prior where it
is thin); Monte-Carlo draws give the probability that each arm is the best, which is its
routing weight (probability matching), above an exploration floor that keeps every
deployment measured. Guardrails (error rate, p95 latency over budget) send an arm to the
floor whatever its quality. A significant change of quality in the recent window (drift)
has the arm judged on that window alone: a drop moves its traffic at once rather than
after the half-life, a recovery wins it back before the floor's trickle outweighs the past.

Why Thompson sampling: scripts/bandit_poc.py routes the same seeded worlds (the real
Router; quality 0.80/0.95/0.97 at $0.0002/$0.001/$0.005 a request; weights recomputed
every 100 requests; 20 seeds) with it, ε-greedy (same floor) and batch UCB1. Share of
requests 1,500-2,000 answered by the best deployment, mean (worst seed), and regret:

    pass/fail scores   cost_optimized     balanced           quality_optimized  drift
    thompson           0.94 (0.82)  42    0.88 (0.41)  20    0.84 (0.36)  22    0.95 (0.91)  35
    ε-greedy           0.95 (0.94)  39    0.86 (0.02)  18    0.75 (0.02)  23    0.92 (0.20)  51
    ucb1               0.75 (0.60)  88    0.56 (0.40)  55    0.51 (0.20)  56    0.71 (0.40)  85

With graded (judge-like) scores Thompson and ε-greedy send 0.95-0.96 to the best under
every policy, UCB1 about half. Thompson matches ε-greedy where arms are easy to tell
apart and is far more robust where they are not: ε-greedy trusts early noise and can
lock on the wrong deployment (worst seed 0.02); UCB1's bonus, sized for rewards spanning
[0, 1], keeps whole batches on arms a few points apart. When the favoured deployment
drops from 0.97 to 0.80, Thompson with the drift rule moves its traffic in one run (100
requests; 155 without the rule, ε-greedy 215, UCB1 160). No algorithm settles 0.95
against 0.97 on 2,000 pass/fail scores: that gap needs graded scores or more traffic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from app.config import Policy
from app.cycle.evidence import EMPTY, Bucket, Summary, since, summarize

if TYPE_CHECKING:
    from app.config import Settings
    from app.routing.config import CycleConfig

# USD per request that one whole quality point (1.0) is worth; read it as "0.01 quality
# is worth $0.0001 / $0.001 / $0.01 a request". At $0.0001-$0.005 a request,
# cost_optimized takes a deployment a few points worse to pay a fifth; quality_optimized
# pays a few tenths of a cent for two points.
COST_SENSITIVITY: dict[Policy, float] = {
    "cost_optimized": 0.01,
    "balanced": 0.1,
    "quality_optimized": 1.0,
}
# Latency penalty: none up to the budget, then linear to its cap at twice the budget
# (bounded: a slow arm is for the guardrail to stop, the penalty only ranks slow arms).
LATENCY_PENALTY_MAX = 0.2
# Prior on a mean quality nobody has measured: centred on the route's pooled mean, wide
# enough (±0.5 at 2 sd) that a new deployment is explored rather than trusted or ignored.
PRIOR_SD = 0.25
# Per-score variance assumed before scores say otherwise, worth this many scores: a few
# identical early scores must not read as certainty.
VARIANCE_PRIOR = 0.05
VARIANCE_PRIOR_N = 5.0
DRAWS = 4000  # Monte-Carlo draws: P(best) to within about ±0.01
GUARDRAIL_MIN_REQUESTS = 20  # requests before a p95 or an error rate is judged
RECENT_MIN_REQUESTS = 30  # the recent window reaches back until it holds this many
GUARDRAIL_Z = 2.326  # error rate: its one-sided 99% lower bound must be over the budget

Guardrail = Literal["error_rate", "p95_latency"]


@dataclass(frozen=True, slots=True)
class DriftRule:
    """A significant change: the recent mean off the earlier one by `min_change` or more,
    with enough scores on both sides, at z ≥ `z` for a drop (every arm is tested every
    run, hundreds of times a day: false alarms must be rare) and z ≥ `rise_z` for a rise.
    Rises are looked for only in an arm held at the floor (a recovery, which can wait
    a run or two), where a short window of lucky scores is the likelier false alarm."""

    z: float = 3.0
    rise_z: float = 3.5
    min_change: float = 0.03
    min_recent: float = 30.0
    min_before: float = 30.0


@dataclass(frozen=True, slots=True)
class BanditConfig:
    policy: Policy = "balanced"
    exploration: float = 0.05  # total weight the arms other than the best share
    min_observations: int = 100  # scores on the route before the bandit has full say
    latency_budget_ms: float | None = None
    error_rate_budget: float = 0.05
    draws: int = DRAWS
    drift: DriftRule = DriftRule()

    @classmethod
    def for_route(cls, settings: Settings, cycle: CycleConfig, **overrides: Any) -> BanditConfig:
        """From FLYWHEEL_POLICY, FLYWHEEL_CYCLE_* and the route's cycle block; budgets the
        monitor has learned go in `overrides`."""
        values: dict[str, Any] = {
            "policy": settings.flywheel_policy,
            "exploration": settings.flywheel_cycle_exploration,
            "min_observations": settings.flywheel_cycle_min_observations,
            "latency_budget_ms": cycle.latency_budget_ms,
            **overrides,
        }
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ArmEvidence:
    """One deployment's evidence, both summaries taken with the same `now` and half-life.

    `recent` is the window since the last cycle run, reaching further back while it holds
    fewer than RECENT_MIN_REQUESTS requests (an arm at the floor gets a few a run): it
    must lie inside `long_run`, as the drift test subtracts it, and `recent_start` is
    where it begins."""

    name: str
    long_run: Summary
    recent: Summary = EMPTY
    recent_start: float | None = None
    # The last interval alone was too thin (an arm held at the floor): look for recoveries.
    recent_extended: bool = False
    configured_weight: float = 1.0

    @classmethod
    def from_buckets(
        cls,
        name: str,
        buckets: Sequence[Bucket],
        *,
        now: float,
        half_life_s: float,
        recent_start: float,
        reset_at: float | None = None,
        configured_weight: float = 1.0,
    ) -> ArmEvidence:
        """`recent_start`: the last run's time; the recent window starts there, or earlier
        while it is thin. `reset_at`: where the last change of quality was detected
        (`RouteDecision.resets`); the evidence before it is of a deployment that is gone."""
        recent: list[Bucket] = []
        count = 0
        for b in sorted(buckets, key=lambda b: b.start, reverse=True):
            if b.start < recent_start and count >= RECENT_MIN_REQUESTS:
                break
            recent.append(b)
            count += b.requests
        start = recent[-1].start if recent else recent_start
        kept = buckets if reset_at is None else since(buckets, min(reset_at, start))
        return cls(
            name=name,
            long_run=summarize(kept, now, half_life_s),
            recent=summarize(recent, now, half_life_s),
            recent_start=start,
            recent_extended=start < recent_start,
            configured_weight=configured_weight,
        )


@dataclass(frozen=True, slots=True)
class Posterior:
    mean: float
    stderr: float


@dataclass(frozen=True, slots=True)
class Drift:
    """A significant change of an arm's quality: a drop (alert-worthy) or a rise (a
    recovery). Either way the evidence before `since` is stale."""

    direction: Literal["drop", "rise"]
    before: float  # mean quality before the recent window
    recent: float
    z: float  # |difference| / its standard error
    n_recent: float
    since: float | None  # the recent window's start: reset the arm's evidence there


@dataclass(frozen=True, slots=True)
class ArmDecision:
    name: str
    weight: float
    p_best: float
    reward_mean: float
    reward_stderr: float
    quality: float | None
    n_scored: float
    cost_per_request: float
    p95_latency_ms: float | None
    error_rate: float
    guardrail: Guardrail | None = None
    drift: Drift | None = None  # a drop: alert
    recovery: Drift | None = None  # a rise of an arm held at the floor


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """One cycle run's decision for a route: `weights` go to Redis, `to_dict()` to the run
    record."""

    route: str
    policy: Policy
    evidence: float  # 0..1: how far the bandit overrides the configured weights
    arms: tuple[ArmDecision, ...] = field(default_factory=tuple)
    guardrails_waived: bool = False  # every arm tripped: none could take the traffic

    @property
    def weights(self) -> dict[str, float]:
        return {a.name: a.weight for a in self.arms}

    @property
    def best(self) -> str | None:
        return max(self.arms, key=lambda a: a.weight).name if self.arms else None

    @property
    def drifted(self) -> list[str]:
        """Arms whose quality dropped significantly (for the monitor's alerts)."""
        return [a.name for a in self.arms if a.drift is not None]

    @property
    def resets(self) -> dict[str, float]:
        """Where each changed arm's evidence starts from now on, drops and recoveries
        alike: the worker keeps these and passes them back as `from_buckets(reset_at=)`."""
        changes = ((a.name, a.drift or a.recovery) for a in self.arms)
        return {n: c.since for n, c in changes if c is not None and c.since is not None}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": self.weights, "best": self.best}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteDecision:
        arms = []
        for raw in data["arms"]:
            changes = {k: Drift(**raw[k]) if raw.get(k) else None for k in ("drift", "recovery")}
            arms.append(ArmDecision(**{**raw, **changes}))
        return cls(
            route=data["route"],
            policy=cast(Policy, data["policy"]),
            evidence=data["evidence"],
            arms=tuple(arms),
            guardrails_waived=data.get("guardrails_waived", False),
        )


def latency_penalty(p95_latency_ms: float | None, budget_ms: float | None) -> float:
    if p95_latency_ms is None or budget_ms is None or p95_latency_ms <= budget_ms:
        return 0.0
    return LATENCY_PENALTY_MAX * min(1.0, p95_latency_ms / budget_ms - 1.0)


def reward(
    quality: float,
    cost_per_request: float,
    p95_latency_ms: float | None = None,
    *,
    policy: Policy,
    latency_budget_ms: float | None = None,
) -> float:
    return (
        quality
        - cost_per_request / COST_SENSITIVITY[policy]
        - latency_penalty(p95_latency_ms, latency_budget_ms)
    )


def quality_posterior(s: Summary, prior_mean: float) -> Posterior:
    """Normal-normal update of the mean quality; the per-score variance is shrunk
    towards VARIANCE_PRIOR while scores are few."""
    n = s.n_scored
    if s.quality is None or n <= 0:
        return Posterior(prior_mean, PRIOR_SD)
    dof = max(0.0, n - 1.0)
    var = (s.variance * dof + VARIANCE_PRIOR * VARIANCE_PRIOR_N) / (dof + VARIANCE_PRIOR_N)
    precision = 1.0 / PRIOR_SD**2 + n / var
    mean = (prior_mean / PRIOR_SD**2 + n * s.quality / var) / precision
    return Posterior(mean, 1.0 / math.sqrt(precision))


def detect_drift(
    long_run: Summary,
    recent: Summary,
    rule: DriftRule = DriftRule(),
    since: float | None = None,
    rises: bool = False,
) -> Drift | None:
    """Whether quality in `recent` dropped (or, with `rises`, rose) significantly from
    the rest of `long_run`.

    The recent window is part of the long run, so it is taken out first (with the same
    decay the sums subtract exactly): against an average that contains it, most of a
    change would be hidden."""
    if long_run.quality is None or recent.quality is None or recent.n_scored < rule.min_recent:
        return None
    n_b = long_run.n_scored - recent.n_scored
    if n_b < rule.min_before:
        return None
    mean_b = (long_run.quality * long_run.n_scored - recent.quality * recent.n_scored) / n_b
    sq_b = _sum_sq(long_run) - _sum_sq(recent)
    var_b = max(0.0, sq_b / n_b - mean_b**2) * n_b / (n_b - 1.0)
    change = recent.quality - mean_b
    # Welch's standard error: an outage's window (zeros among good scores) has a variance
    # far from a healthy one's. A short window's own variance can be ~0 (31 perfect
    # scores happen to a 0.95 deployment), so it is shrunk towards the earlier one's.
    n_r = recent.n_scored
    k = VARIANCE_PRIOR_N * 2
    var_r = (recent.variance * max(0.0, n_r - 1.0) + var_b * k) / (max(0.0, n_r - 1.0) + k)
    se = math.sqrt(max(var_b, 1e-4) / n_b + max(var_r, 1e-4) / n_r)
    z = abs(change) / se
    if abs(change) < rule.min_change or z < (rule.rise_z if change > 0 else rule.z):
        return None
    if change > 0 and not rises:
        return None
    return Drift(
        direction="drop" if change < 0 else "rise",
        before=mean_b,
        recent=recent.quality,
        z=z,
        n_recent=n_r,
        since=since,
    )


def _sum_sq(s: Summary) -> float:
    """Σ w·q², back from a summary's mean and (unbiased) variance."""
    q = s.quality or 0.0
    return s.variance * max(0.0, s.n_scored - 1.0) + s.n_scored * q * q


def newest(arm: ArmEvidence) -> Summary | None:
    """The arm's newest evidence with enough requests to judge a budget on: a regression
    shows there at once, in the decayed long run only after hours (and a recovery too)."""
    candidates = (arm.recent, arm.long_run)
    return next((c for c in candidates if c.count >= GUARDRAIL_MIN_REQUESTS), None)


def guardrail(arm: ArmEvidence, config: BanditConfig) -> Guardrail | None:
    """The budget the arm is over, on its newest evidence."""
    s = newest(arm)
    if s is None:
        return None
    # A lower confidence bound, not the point estimate: an arm at a 5% error rate shows
    # 3 errors in 20 requests one time in 13, which would flap.
    if _wilson_lower(s.error_rate, s.n) > config.error_rate_budget:
        return "error_rate"
    budget = config.latency_budget_ms
    if budget is not None and s.p95_latency_ms is not None and s.p95_latency_ms > budget:
        return "p95_latency"
    return None


def _wilson_lower(rate: float, n: float) -> float:
    if n <= 0:
        return 0.0
    z2 = GUARDRAIL_Z**2
    centre = rate + z2 / (2 * n)
    spread = GUARDRAIL_Z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def probability_best(
    posteriors: Mapping[str, Posterior], rng: random.Random, draws: int = DRAWS
) -> dict[str, float]:
    """P(arm has the highest mean reward), from `draws` joint draws of the posteriors."""
    names = list(posteriors)
    if len(names) <= 1:
        return dict.fromkeys(names, 1.0)
    wins = dict.fromkeys(names, 0)
    params = [(n, posteriors[n].mean, posteriors[n].stderr) for n in names]
    for _ in range(draws):
        best_name, best_value = names[0], -math.inf
        for name, mean, sd in params:
            value = rng.gauss(mean, sd)
            if value > best_value:
                best_name, best_value = name, value
        wins[best_name] += 1
    return {n: wins[n] / draws for n in names}


def apply_floor(
    shares: Mapping[str, float], floor: float, pinned: Collection[str] = ()
) -> dict[str, float]:
    """Weights summing to 1: `pinned` arms get exactly `floor`, the others at least
    `floor` and the rest in proportion to `shares`."""
    names = list(shares)
    if not names:
        return {}
    floor = min(max(0.0, floor), 1.0 / len(names))
    out = {n: floor for n in names if n in pinned}
    free = [n for n in names if n not in out]
    if not free:
        return {n: 1.0 / len(names) for n in names}
    while True:  # each pass fixes at least one arm at the floor, or ends
        left = 1.0 - floor * len(out)
        total = sum(max(0.0, shares[n]) for n in free)
        alloc = {
            n: left * (max(0.0, shares[n]) / total if total > 0 else 1.0 / len(free)) for n in free
        }
        low = [n for n in free if alloc[n] < floor]
        if not low or len(low) == len(free):
            out.update(alloc)
            return {n: out[n] for n in names}
        out.update(dict.fromkeys(low, floor))
        free = [n for n in free if n not in low]


def decide(
    route: str, arms: Sequence[ArmEvidence], config: BanditConfig, rng: random.Random
) -> RouteDecision:
    """One cycle's weights for a route; the same `rng` state gives the same decision."""
    judged: dict[str, Summary] = {}
    drifts: dict[str, Drift | None] = {}
    for arm in arms:
        drifts[arm.name] = detect_drift(
            arm.long_run, arm.recent, config.drift, arm.recent_start, arm.recent_extended
        )
        # After a significant change the older evidence describes a deployment that no
        # longer exists: judge the arm on the recent window alone.
        judged[arm.name] = arm.recent if drifts[arm.name] else arm.long_run
    tripped = {a.name: g for a in arms if (g := guardrail(a, config))}
    waived = bool(arms) and len(tripped) == len(arms)

    # Latency as the guardrail sees it: hours-old slow requests must not hold back an arm
    # that has recovered.
    p95 = {a.name: (newest(a) or judged[a.name]).p95_latency_ms for a in arms}
    posteriors = _reward_posteriors(judged, p95, config)
    p_best = probability_best(posteriors, rng, config.draws)
    eligible = {n: p for n, p in posteriors.items() if waived or n not in tripped}
    if len(eligible) < len(posteriors):
        shares = probability_best(eligible, rng, config.draws)
    else:
        shares = p_best

    # Little evidence on the route: lean on the configured weights, handing over to the
    # bandit as scores accumulate.
    evidence = min(1.0, sum(s.n_scored for s in judged.values()) / config.min_observations)
    configured = _normalised({a.name: a.configured_weight for a in arms if a.name in eligible})
    blended = {
        n: evidence * shares.get(n, 0.0) + (1.0 - evidence) * configured.get(n, 0.0)
        for n in posteriors
    }
    floor = config.exploration / (len(arms) - 1) if len(arms) > 1 else 0.0
    weights = apply_floor(blended, floor, () if waived else tripped)
    decisions = []
    for a in arms:
        s, post, change = judged[a.name], posteriors[a.name], drifts[a.name]
        decisions.append(
            ArmDecision(
                name=a.name,
                weight=weights[a.name],
                p_best=p_best[a.name],
                reward_mean=post.mean,
                reward_stderr=post.stderr,
                quality=s.quality,
                n_scored=s.n_scored,
                cost_per_request=s.cost_per_request,
                p95_latency_ms=p95[a.name],
                error_rate=s.error_rate,
                guardrail=tripped.get(a.name),
                drift=change if change and change.direction == "drop" else None,
                recovery=change if change and change.direction == "rise" else None,
            )
        )
    return RouteDecision(route, config.policy, evidence, tuple(decisions), waived)


def _reward_posteriors(
    judged: Mapping[str, Summary], p95: Mapping[str, float | None], config: BanditConfig
) -> dict[str, Posterior]:
    """The quality posterior shifted by the arm's cost and latency terms, which are known
    far more precisely than quality and are taken as exact."""
    scored = [s for s in judged.values() if s.quality is not None and s.n_scored > 0]
    n_total = sum(s.n_scored for s in scored)
    prior = sum((s.quality or 0.0) * s.n_scored for s in scored) / n_total if n_total else 0.5
    measured = [s.cost_per_request for s in judged.values() if s.count > 0]
    # An arm with no requests yet costs what the others do: neither free nor dear.
    pooled_cost = sum(measured) / len(measured) if measured else 0.0
    out = {}
    for name, s in judged.items():
        q = quality_posterior(s, prior)
        shift = reward(
            0.0,
            s.cost_per_request if s.count > 0 else pooled_cost,
            p95[name],
            policy=config.policy,
            latency_budget_ms=config.latency_budget_ms,
        )
        out[name] = Posterior(q.mean + shift, q.stderr)
    return out


def _normalised(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(max(0.0, w) for w in weights.values())
    if total <= 0:
        return {n: 1.0 / len(weights) for n in weights}
    return {n: max(0.0, w) / total for n, w in weights.items()}
