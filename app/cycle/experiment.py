"""Decisions of prompt experiments: promote, retire, or keep testing; after a promotion,
keep or roll back.

An experiment runs K variants of a route's system prompt against its control (the
current baseline), all on the same traffic since the experiment started. The cycle calls
`decide` on every run with each arm's summary of that traffic (no decay: the test
assumes independent draws from a fixed distribution since the start, so every score
weighs the same). Each variant is compared with the control through an always-valid
confidence sequence for (variant - control) (see `sequential`) at level alpha / K
(Bonferroni), alpha = 1 - confidence. Its two bounds are one-sided sequences, each
crossed wrongly with probability at most alpha / K under the cycle's peeking and
data-dependent stopping: a variant no better than `min_improvement` is promoted with
probability at most alpha / K (at most alpha for the whole experiment), and one that is
at least that much better is wrongly given up for futility with at most the same. For
any true difference only one of the two can be an error, so no further split is needed.

Per variant, once both arms have `min_sample` scores:
- promote       the lower bound exceeds `min_improvement`: the variant is better by at
                least that much; of several such variants only the best estimate wins,
                and the experiment ends (the rest are retired as superseded — kept, to be
                re-tested against the new baseline);
- retire        the upper bound is below `min_improvement`: the variant cannot be
                `min_improvement` better (futility), so its traffic is wasted;
- inconclusive  both arms reached `max_sample` with neither bound across: stop paying
                for the test; the control stays;
- continue      otherwise.

After a promotion the cycle calls `watch` with the promoted variant's scores since the
promotion and the old baseline's statistics frozen at decision time (`Arm.to_dict` /
`Arm.from_dict` round-trip them through storage): `rollback` once the upper bound of
(promoted - baseline) is below 0 — significantly worse than what it replaced —, `keep`
after `watch_sample` scores without that, else `watch`.

Every verdict carries its statistics (`to_dict()`, JSON-friendly) to be stored with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from app.cycle.evidence import Summary
from app.cycle.sequential import Arm, Interval, difference_sequence, frozen_difference

if TYPE_CHECKING:
    from app.config import Settings


class Verdict(StrEnum):
    PROMOTE = "promote"
    RETIRE = "retire"
    INCONCLUSIVE = "inconclusive"
    CONTINUE = "continue"


class WatchVerdict(StrEnum):
    ROLLBACK = "rollback"
    KEEP = "keep"
    WATCH = "watch"


# The rule that fired, stored with each verdict.
RULE_MIN_SAMPLE = "min_sample"  # an arm has fewer than min_sample scores
RULE_IMPROVEMENT = "lower_bound_above_min_improvement"
RULE_SUPERSEDED = "superseded"  # another variant won this decision
RULE_FUTILITY = "upper_bound_below_min_improvement"
RULE_MAX_SAMPLE = "max_sample"
RULE_UNDECIDED = "bounds_straddle_min_improvement"
RULE_WORSE = "upper_bound_below_baseline"
RULE_HELD = "watch_sample_reached"
RULE_WATCHING = "bounds_straddle_baseline"


@dataclass(frozen=True, slots=True)
class ExperimentPolicy:
    """The knobs of experiment decisions (`from_settings` reads them from Settings).

    `mixture_scale` (tau of the normal mixture) places the confidence sequence's
    tightest point; unset, it is 1.5 x min_improvement (at least 0.015): a +5-point
    variant needs the bound to resolve a margin of ~3 points over a 2-point minimum, and
    in simulation the samples to a decision are flat in tau from 0.02 to 0.05 and ~15%
    higher at 0.01 or 0.1.

    `watch_sample` defaults to 25 x min_sample (5,000 scores, at most max_sample): by
    then the promoted arm's own bound is ~1.5 points wide, so what limits the watch is the
    frozen baseline's precision — watching longer buys little, and watching costs no
    traffic. Freeze the baseline from as much of its history as is still representative
    (see `watch`).
    """

    min_sample: int = 200
    min_improvement: float = 0.02
    confidence: float = 0.95
    max_sample: int = 20_000
    watch_sample: int | None = None
    mixture_scale: float | None = None

    def __post_init__(self) -> None:
        if self.min_sample <= 0 or self.max_sample < self.min_sample:
            raise ValueError("need 0 < min_sample <= max_sample")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError("confidence must be in (0, 1)")
        if not 0.0 <= self.min_improvement < 1.0:
            raise ValueError("min_improvement must be in [0, 1)")
        if self.mixture_scale is not None and self.mixture_scale <= 0.0:
            raise ValueError("mixture_scale must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> ExperimentPolicy:
        return cls(
            min_sample=settings.flywheel_experiment_min_sample,
            min_improvement=settings.flywheel_experiment_min_improvement,
            confidence=settings.flywheel_experiment_confidence,
            max_sample=max(
                settings.flywheel_experiment_max_sample, settings.flywheel_experiment_min_sample
            ),
        )

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def tau(self) -> float:
        if self.mixture_scale is not None:
            return self.mixture_scale
        return max(1.5 * self.min_improvement, 0.015)

    @property
    def watch_n(self) -> int:
        if self.watch_sample is not None:
            return self.watch_sample
        return min(25 * self.min_sample, self.max_sample)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_sample": self.min_sample,
            "min_improvement": self.min_improvement,
            "confidence": self.confidence,
            "max_sample": self.max_sample,
            "watch_sample": self.watch_n,
            "mixture_scale": self.tau,
        }


def as_arm(stats: Summary | Arm) -> Arm:
    return stats if isinstance(stats, Arm) else Arm.from_summary(stats)


@dataclass(frozen=True, slots=True)
class Comparison:
    """One variant against the control, with the statistics behind its verdict."""

    variant: str
    verdict: Verdict
    rule: str
    arm: Arm
    control: Arm
    interval: Interval  # confidence sequence for (variant - control)
    alpha: float  # per-comparison level (Bonferroni share)

    @property
    def significant(self) -> bool:
        return self.rule == RULE_IMPROVEMENT or self.rule == RULE_SUPERSEDED

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "verdict": self.verdict.value,
            "rule": self.rule,
            "variant_arm": self.arm.to_dict(),
            "control_arm": self.control.to_dict(),
            "difference": self.interval.to_dict(),
            "bounds": "one_sided",  # low and high each hold with probability 1 - alpha
            "alpha": self.alpha,
        }


@dataclass(frozen=True, slots=True)
class ExperimentDecision:
    """One look at an experiment: a verdict per variant and at most one winner."""

    control: Arm
    comparisons: tuple[Comparison, ...]
    winner: str | None
    family_size: int
    policy: ExperimentPolicy

    @property
    def finished(self) -> bool:
        """True when no variant needs more traffic (a winner, or all stopped)."""
        return all(c.verdict is not Verdict.CONTINUE for c in self.comparisons)

    def verdict(self, variant: str) -> Verdict:
        for c in self.comparisons:
            if c.variant == variant:
                return c.verdict
        raise KeyError(variant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "experiment",
            "winner": self.winner,
            "finished": self.finished,
            "control_arm": self.control.to_dict(),
            "family_size": self.family_size,
            "alpha": self.policy.alpha,
            "policy": self.policy.to_dict(),
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def compare(
    name: str, variant: Arm, control: Arm, policy: ExperimentPolicy, alpha: float
) -> Comparison:
    """The verdict of one variant against the control at per-comparison level alpha."""
    interval = difference_sequence(variant, control, alpha, policy.tau, one_sided=True)
    if min(variant.n, control.n) < policy.min_sample:
        verdict, rule = Verdict.CONTINUE, RULE_MIN_SAMPLE
    elif interval.low > policy.min_improvement:
        verdict, rule = Verdict.PROMOTE, RULE_IMPROVEMENT
    elif interval.high < policy.min_improvement:
        verdict, rule = Verdict.RETIRE, RULE_FUTILITY
    elif min(variant.n, control.n) >= policy.max_sample:
        verdict, rule = Verdict.INCONCLUSIVE, RULE_MAX_SAMPLE
    else:
        verdict, rule = Verdict.CONTINUE, RULE_UNDECIDED
    return Comparison(name, verdict, rule, variant, control, interval, alpha)


def decide(
    control: Summary | Arm,
    variants: Mapping[str, Summary | Arm],
    policy: ExperimentPolicy,
    *,
    family_size: int | None = None,
) -> ExperimentDecision:
    """Decide an experiment from the arms' statistics since it started.

    `family_size` is the number of variants the experiment started with (the Bonferroni
    divisor); pass it once some have been retired, so the survivors' level stays fixed —
    letting K shrink as variants drop out would spend more than alpha in total.
    """
    k = max(family_size if family_size is not None else len(variants), len(variants), 1)
    alpha = policy.alpha / k
    base = as_arm(control)
    found = [compare(name, as_arm(s), base, policy, alpha) for name, s in variants.items()]
    significant = [c for c in found if c.verdict is Verdict.PROMOTE]
    if not significant:
        return ExperimentDecision(base, tuple(found), None, k, policy)
    best = max(significant, key=lambda c: (c.interval.estimate, c.interval.low))
    final = tuple(
        c
        if c is best
        else Comparison(
            c.variant, Verdict.RETIRE, RULE_SUPERSEDED, c.arm, c.control, c.interval, c.alpha
        )
        for c in found
    )
    return ExperimentDecision(base, final, best.variant, k, policy)


@dataclass(frozen=True, slots=True)
class WatchDecision:
    """One look at a promoted variant against the baseline it replaced."""

    verdict: WatchVerdict
    rule: str
    promoted: Arm  # since the promotion
    baseline: Arm  # frozen at the promotion
    interval: Interval  # bound on (promoted - baseline)
    alpha: float
    policy: ExperimentPolicy

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "watch",
            "verdict": self.verdict.value,
            "rule": self.rule,
            "promoted_arm": self.promoted.to_dict(),
            "baseline_arm": self.baseline.to_dict(),
            "difference": self.interval.to_dict(),
            "bounds": "one_sided",
            "alpha": self.alpha,
            "policy": self.policy.to_dict(),
        }


def watch(promoted: Summary | Arm, baseline: Arm, policy: ExperimentPolicy) -> WatchDecision:
    """Keep or roll back a promoted variant, from its scores since the promotion and the
    old baseline's statistics frozen at the decision.

    The promoted arm gets an always-valid bound (it is looked at every run); the frozen
    baseline's error never shrinks, so it gets its own sequence and the two radii add
    (`sequential.frozen_difference`), each at alpha / 2: a promotion that holds its
    ground is rolled back with probability at most alpha. The frozen baseline is what
    limits the watch: an experiment that stopped early stopped on a control that looked
    low, and its few scores pin it down loosely. Frozen from the experiment's control
    arm alone, an 8-point regression is caught in ~90% of simulated promotions (the
    misses follow promotions at under ~700 scores per arm); frozen from the control's
    buckets over the cycle window, pre-experiment traffic included (`Arm.from_buckets`),
    in all of them.
    """
    arm = as_arm(promoted)
    interval = frozen_difference(arm, baseline, policy.alpha, policy.tau, one_sided=True)
    if arm.n < policy.min_sample:
        verdict, rule = WatchVerdict.WATCH, RULE_MIN_SAMPLE
    elif interval.high < 0.0:
        verdict, rule = WatchVerdict.ROLLBACK, RULE_WORSE
    elif arm.n >= policy.watch_n:
        verdict, rule = WatchVerdict.KEEP, RULE_HELD
    else:
        verdict, rule = WatchVerdict.WATCH, RULE_WATCHING
    return WatchDecision(verdict, rule, arm, baseline, interval, policy.alpha, policy)
