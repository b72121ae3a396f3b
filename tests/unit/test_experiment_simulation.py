"""Seeded simulations of prompt experiments driven through the real code path: simulated
requests are aggregated into `Bucket`s (one per arm and 100-request block, as the worker
aggregates them by time bucket), summarised by `summarize` without decay, and decided by
`decide` / `watch` after every block — the cycle peeking every 5 minutes.

Per-request quality is drawn from Bernoulli(q) (the noisiest [0, 1] score of a given
mean) or from rule-like scores in {0, 0.3, 1}. The acceptance criteria:
- a variant truly 5 points better is promoted in >= 90% of 50 seeds (50/50 and 10% split);
- in A/A runs a variant is promoted in <= 5% of runs (50 seeds, and 400 for the estimate);
- a promoted variant that regresses 8 points below the old baseline is rolled back; one
  that holds is kept in the large majority of seeds.
"""

from __future__ import annotations

import json
import math
import random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from statistics import median

import pytest

from app.cycle.evidence import Bucket, Summary, summarize
from app.cycle.experiment import (
    ExperimentDecision,
    ExperimentPolicy,
    Verdict,
    WatchDecision,
    WatchVerdict,
    as_arm,
    decide,
    watch,
)
from app.cycle.sequential import Arm

BLOCK = 100  # requests per arm (of the smaller arm) between two looks
LOOK_S = 300.0  # one look per cycle run, every 5 minutes
POLICY = ExperimentPolicy()  # the defaults of Settings: 200, 0.02, 0.95, 20,000


@dataclass(frozen=True)
class Scores:
    """A discrete distribution of per-request quality scores."""

    values: tuple[float, ...]
    cumulative: tuple[float, ...]

    @classmethod
    def of(cls, weights: dict[float, float]) -> Scores:
        assert all(w >= 0 for w in weights.values())
        assert math.isclose(sum(weights.values()), 1.0)
        return cls(tuple(weights), tuple(accumulate(weights.values())))

    @property
    def mean(self) -> float:
        probs = [b - a for a, b in zip((0.0, *self.cumulative), self.cumulative, strict=False)]
        return sum(v * p for v, p in zip(self.values, probs, strict=True))

    def bucket(self, rng: random.Random, requests: int, start: float) -> Bucket:
        """One bucket of `requests` scored requests, aggregated as the worker does."""
        counts = [0] * len(self.values)
        draw, cum, last = rng.random, self.cumulative, len(self.values) - 1
        for _ in range(requests):
            counts[min(bisect_right(cum, draw()), last)] += 1
        q_sum = sum(c * v for c, v in zip(counts, self.values, strict=True))
        q_sq = sum(c * v * v for c, v in zip(counts, self.values, strict=True))
        return Bucket(start=start, requests=requests, scored=requests, q_sum=q_sum, q_sq=q_sq)


def bernoulli(q: float) -> Scores:
    return Scores.of({0.0: 1.0 - q, 1.0: q})


def rules(q: float) -> Scores:
    """Rule-like scores: 0 (failure), 0.3 (degraded), 1 (fine), 10% degraded."""
    return Scores.of({0.0: 1.0 - 0.1 - (q - 0.03), 0.3: 0.1, 1.0: q - 0.03})


def arm_summary(buckets: list[Bucket], now: float) -> Summary:
    return summarize(buckets, now, math.inf)  # no decay: i.i.d. since the start


@dataclass
class Run:
    decision: ExperimentDecision
    control: Summary  # the control's summary at the decision
    looks: int

    @property
    def variant_n(self) -> float:
        return min(c.arm.n for c in self.decision.comparisons)


def run_experiment(
    seed: int,
    control: Scores,
    variants: dict[str, Scores],
    policy: ExperimentPolicy = POLICY,
    share: float = 0.5,
) -> Run:
    """An experiment until `decide` says it is finished. Each variant receives `share` of
    the traffic when alone (the rest to the control), else an even split."""
    rng = random.Random(seed)
    if len(variants) == 1:
        small = min(share, 1.0 - share)
        total = round(BLOCK / small)
        per_variant = round(total * share)
        per_control = total - per_variant
    else:
        per_variant = per_control = BLOCK
    control_buckets: list[Bucket] = []
    variant_buckets: dict[str, list[Bucket]] = {name: [] for name in variants}
    live = dict(variants)
    looks = 0
    while True:
        looks += 1
        now = looks * LOOK_S
        control_buckets.append(control.bucket(rng, per_control, now - LOOK_S))
        for name, scores in live.items():
            variant_buckets[name].append(scores.bucket(rng, per_variant, now - LOOK_S))
        summary = arm_summary(control_buckets, now)
        decision = decide(
            summary,
            {name: arm_summary(variant_buckets[name], now) for name in live},
            policy,
            family_size=len(variants),
        )
        if decision.finished:
            return Run(decision, summary, looks)
        live = {n: s for n, s in live.items() if decision.verdict(n) is Verdict.CONTINUE}


def run_watch(
    seed: int, baseline: Summary | Arm, after: Scores, policy: ExperimentPolicy = POLICY
) -> WatchDecision:
    """The watch after a promotion: the promoted variant serves everything, looked at
    every block, against the baseline frozen (stored and read back) at the decision."""
    frozen = Arm.from_dict(as_arm(baseline).to_dict())
    rng = random.Random(seed)
    buckets: list[Bucket] = []
    looks = 0
    while True:
        looks += 1
        now = looks * LOOK_S
        buckets.append(after.bucket(rng, BLOCK, now - LOOK_S))
        verdict = watch(arm_summary(buckets, now), frozen, policy)
        if verdict.verdict is not WatchVerdict.WATCH:
            return verdict


def frozen_with_history(seed: int, run: Run, control: Scores, history: int) -> Arm:
    """The baseline frozen from the control's buckets over the window: `history`
    pre-experiment requests (it served all traffic then) plus its experiment arm."""
    rng = random.Random(50_000 + seed)
    before = [control.bucket(rng, BLOCK, -LOOK_S * (i + 1)) for i in range(history // BLOCK)]
    during = Arm.from_summary(run.control)
    pooled = Arm.from_buckets(before)
    n = pooled.n + during.n
    mean = (pooled.n * pooled.mean + during.n * during.mean) / n
    squares = sum(
        (a.n - 1) * a.variance + a.n * a.mean * a.mean for a in (pooled, during) if a.n > 0
    )
    return Arm(n, mean, (squares - n * mean * mean) / (n - 1))


def rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


SEEDS = range(50)
DISTRIBUTIONS = {"bernoulli": bernoulli, "rules": rules}


# --- A truly better variant is promoted ------------------------------------------------


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("share", [0.5, 0.1])
def test_five_points_better_is_promoted(kind: str, share: float) -> None:
    dist = DISTRIBUTIONS[kind]
    runs = [run_experiment(s, dist(0.85), {"v": dist(0.90)}, share=share) for s in SEEDS]
    assert rate([r.decision.winner == "v" for r in runs]) >= 0.9
    # It is the one sequential look that decides, well before the maximum sample.
    assert median(r.variant_n for r in runs) < POLICY.max_sample / 4
    for r in runs:
        if r.decision.winner:
            (c,) = r.decision.comparisons
            assert c.interval.low > POLICY.min_improvement
            assert min(c.arm.n, c.control.n) >= POLICY.min_sample


def test_best_of_three_variants_wins() -> None:
    variants = {"same": bernoulli(0.85), "better": bernoulli(0.90), "slightly": bernoulli(0.86)}
    runs = [run_experiment(s, bernoulli(0.85), variants) for s in SEEDS]
    assert rate([r.decision.winner == "better" for r in runs]) >= 0.9
    assert all(r.decision.winner in {None, "better", "slightly"} for r in runs)


# --- No real difference: false promotions stay rare -----------------------------------


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_aa_false_promotions_are_rare(kind: str) -> None:
    dist = DISTRIBUTIONS[kind]
    seeds = 400 if kind == "bernoulli" else 100
    runs = [run_experiment(s, dist(0.85), {"v": dist(0.85)}) for s in range(seeds)]
    promoted = [r.decision.winner is not None for r in runs]
    assert rate(promoted[:50]) <= 0.05
    assert rate(promoted) <= 0.05
    # Futility ends almost every A/A test long before the maximum sample.
    assert rate([r.decision.comparisons[0].verdict is Verdict.RETIRE for r in runs]) >= 0.9


def test_aa_with_three_variants_false_promotions_are_rare() -> None:
    variants = {name: bernoulli(0.85) for name in ("a", "b", "c")}
    runs = [run_experiment(s, bernoulli(0.85), variants) for s in range(100)]
    assert rate([r.decision.winner is not None for r in runs]) <= 0.05


def peeking_errors(seed: int, looks: int) -> tuple[bool, bool]:
    """An A/A stream looked at every block with min_improvement 0: does the confidence
    sequence ever claim a difference, and does a fixed-n one-sided z-test at 95%?"""
    policy = ExperimentPolicy(min_improvement=0.0, max_sample=looks * BLOCK)
    dist = bernoulli(0.85)
    rng = random.Random(seed)
    control: list[Bucket] = []
    variant: list[Bucket] = []
    naive = False
    for look in range(1, looks + 1):
        now = look * LOOK_S
        control.append(dist.bucket(rng, BLOCK, now - LOOK_S))
        variant.append(dist.bucket(rng, BLOCK, now - LOOK_S))
        c, v = arm_summary(control, now), arm_summary(variant, now)
        (comparison,) = decide(c, {"v": v}, policy).comparisons
        if comparison.arm.n >= policy.min_sample:
            assert v.quality is not None
            assert c.quality is not None
            z = (v.quality - c.quality) / math.hypot(v.stderr, c.stderr)
            naive = naive or z > 1.6449
        if comparison.verdict is Verdict.PROMOTE:
            return True, True
        if comparison.verdict is not Verdict.CONTINUE:
            return False, naive
    return False, naive


def test_sequence_stays_valid_under_peeking_where_a_z_test_does_not() -> None:
    # Without the 2-point margin, what is left is the test's own error under peeking.
    errors = [peeking_errors(s, looks=40) for s in range(300)]
    assert rate([ours for ours, _ in errors]) <= 0.05
    assert rate([naive for _, naive in errors]) > 0.10


# --- After a promotion: roll back a regression, keep what holds -----------------------


def promotions(dist: Callable[[float], Scores], share: float) -> list[tuple[int, Run]]:
    runs = [(s, run_experiment(s, dist(0.85), {"v": dist(0.90)}, share=share)) for s in SEEDS]
    return [(s, r) for s, r in runs if r.decision.winner == "v"]


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_regression_is_rolled_back(kind: str) -> None:
    dist = DISTRIBUTIONS[kind]
    promoted = promotions(dist, 0.5)
    # Baseline frozen from the experiment's control arm only: early stops leave it loose.
    alone = [run_watch(s, r.control, dist(0.77)) for s, r in promoted]
    assert rate([w.verdict is WatchVerdict.ROLLBACK for w in alone]) >= 0.85
    # Frozen with a day's pre-experiment history of the control: every one is caught.
    pooled = [
        run_watch(s, frozen_with_history(s, r, dist(0.85), 2_000), dist(0.77)) for s, r in promoted
    ]
    assert rate([w.verdict is WatchVerdict.ROLLBACK for w in pooled]) >= 0.95
    assert median(w.promoted.n for w in pooled) <= 1_000  # caught quickly


def test_regression_after_a_skewed_split_is_rolled_back() -> None:
    # At a 10% variant share the control arm is nine times larger: a tight baseline.
    promoted = promotions(bernoulli, 0.1)
    watched = [run_watch(s, r.control, bernoulli(0.77)) for s, r in promoted]
    assert rate([w.verdict is WatchVerdict.ROLLBACK for w in watched]) >= 0.95


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("after", [0.90, 0.85])
def test_promotion_that_holds_is_kept(kind: str, after: float) -> None:
    """Kept when it holds its +5 points, and also when it merely matches the baseline
    (the promotion was lucky, but nothing got worse)."""
    dist = DISTRIBUTIONS[kind]
    watched = [run_watch(s, r.control, dist(after)) for s, r in promotions(dist, 0.5)]
    assert rate([w.verdict is WatchVerdict.KEEP for w in watched]) >= 0.9
    assert all(w.verdict is not WatchVerdict.WATCH for w in watched)


def test_decisions_are_stored_with_their_statistics() -> None:
    run = run_experiment(3, bernoulli(0.85), {"v": bernoulli(0.90)})
    stored = json.loads(json.dumps(run.decision.to_dict()))
    assert stored["winner"] == "v"
    (comparison,) = stored["comparisons"]
    assert comparison["verdict"] == "promote"
    assert comparison["difference"]["low"] > stored["policy"]["min_improvement"]
    assert comparison["variant_arm"]["n"] == comparison["control_arm"]["n"] == run.control.n
    verdict = run_watch(3, run.control, bernoulli(0.77))
    stored_watch = json.loads(json.dumps(verdict.to_dict()))
    assert stored_watch["verdict"] == "rollback"
    assert stored_watch["difference"]["high"] < 0
    assert stored_watch["baseline_arm"] == Arm.from_summary(run.control).to_dict()
