"""Always-valid confidence sequences for quality means and their differences.

The cycle looks at a running experiment every few minutes and stops as soon as the
evidence allows. A fixed-n test checked that often crosses its threshold by chance far
more often than it says: in simulation, a one-sided 95% z-test looked at every 100
requests per arm, up to 4,000, "wins" an A/A test in ~24% of runs. So the bounds here
are *confidence sequences*: with probability at least 1 - alpha they hold at every look
simultaneously, whatever the stopping rule, so the cycle may peek as often as it likes
and stop whenever a bound crosses (the same simulation: ~1%).

The boundary is Robbins' normal mixture (Howard, Ramdas, McAuliffe & Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences"; the same boundary is
the mixture SPRT of Johari et al. 2017, "Always valid inference"). For an estimate whose
sampling variance is `v`, mixing the likelihood ratio over effects drawn from
N(0, tau^2) and applying Ville's inequality gives the half-width

    r(v) = sqrt( v * (1 + v / tau^2) * (log(1 + tau^2 / v) + 2 * log(1 / alpha)) ),

which shrinks like sqrt(v * log(1/v)) — only a log factor slower than a fixed-n
interval. When only one side matters (promotion needs the lower bound, rollback the
upper), the one-sided mixture of the same paper (over effects of one sign) is tighter:
about the two-sided boundary at 2 alpha.

Quality scores are bounded in [0, 1], so sample means are close to normal after a few
hundred scores; the variance is estimated from the data, which makes this the
asymptotic confidence sequence of Waudby-Smith et al. 2023 ("Time-uniform central limit
theory and asymptotic confidence sequences"). Callers require a minimum sample per arm
before acting, which is where that approximation is sound; the simulation tests check
the error rates it actually delivers under the cycle's peeking.

`tau` sets where the boundary is tightest: relative to a fixed-n interval it is
narrowest when v is about tau^2 / 8, where its half-width is about tau. Choose it near
the smallest margin a decision needs to resolve (see `experiment.ExperimentPolicy`).
Everything here is pure arithmetic on sufficient statistics: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from app.cycle.evidence import Bucket, Summary, summarize

# Worst-case variance of a score in [0, 1]; one pseudo-observation of it keeps an arm whose
# first scores happen to be identical (variance 0) from claiming to be noise-free.
MAX_VARIANCE = 0.25


@dataclass(frozen=True, slots=True)
class Arm:
    """Sufficient statistics of one arm's quality scores (independent draws assumed)."""

    n: float  # number of scores (effective count; every weight is 1 without decay)
    mean: float
    variance: float  # sample variance of one score

    @classmethod
    def from_summary(cls, summary: Summary) -> Arm:
        """The arm a `Summary` describes; an arm with no scores has n = 0."""
        if summary.quality is None or summary.n_scored <= 0:
            return cls(0.0, 0.0, 0.0)
        return cls(summary.n_scored, summary.quality, summary.variance)

    @classmethod
    def from_buckets(cls, buckets: Iterable[Bucket]) -> Arm:
        """The arm of these buckets with every score weighing the same (no decay): the
        test assumes independent draws from one distribution over the whole span."""
        return cls.from_summary(summarize(buckets, 0.0, math.inf))

    @property
    def guarded_variance(self) -> float:
        """The variance with one pseudo-score of the worst-case variance mixed in."""
        return (self.n * self.variance + MAX_VARIANCE) / (self.n + 1.0)

    @property
    def mean_variance(self) -> float:
        """The sampling variance of `mean` (inf without scores)."""
        if self.n <= 0:
            return math.inf
        return self.guarded_variance / self.n

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "variance": self.variance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Arm:
        """The arm `to_dict` stored (a baseline frozen at a decision)."""
        return cls(float(data["n"]), float(data["mean"]), float(data["variance"]))


@dataclass(frozen=True, slots=True)
class Interval:
    """A two-sided bound on some value: `estimate` ± `radius`."""

    estimate: float
    radius: float

    @property
    def low(self) -> float:
        return self.estimate - self.radius

    @property
    def high(self) -> float:
        return self.estimate + self.radius

    def to_dict(self) -> dict[str, Any]:
        finite = math.isfinite(self.radius)
        return {
            "estimate": self.estimate,
            "radius": self.radius if finite else None,
            "low": self.low if finite else None,
            "high": self.high if finite else None,
        }


def mixture_radius(v: float, alpha: float, tau: float, *, one_sided: bool = False) -> float:
    """Half-width of the normal-mixture confidence sequence for an estimate of sampling
    variance `v`: two-sided at level 1 - alpha, or, with `one_sided`, a bound on one side
    only that is crossed with probability at most alpha (Howard et al. 2021's one-sided
    mixture, which mixes over effects of one sign: about the two-sided bound at 2 alpha).
    Increasing in `v`, so it narrows as data accumulates; 0 at v = 0, inf at v = inf."""
    if not 0.0 < alpha < 0.5:
        raise ValueError("alpha must be in (0, 0.5)")
    if tau <= 0.0:
        raise ValueError("tau must be positive")
    if v <= 0.0:
        return 0.0
    if math.isinf(v):
        return math.inf
    # With x = tau^2 / v, the mixture martingale at radius r is a function of
    # z = r / sqrt(w), w = v * (1 + 1 / x); the boundary is where it reaches 1 / alpha.
    x = tau * tau / v
    w = v * (1.0 + 1.0 / x)
    if not one_sided:
        # -log(1 + x) / 2 + z^2 / 2 = log(1 / alpha)
        return math.sqrt(w * (math.log1p(x) + 2.0 * math.log(1.0 / alpha)))
    # log(4 / (1 + x)) / 2 + z^2 / 2 + log(Phi(z)) = log(1 / alpha). The left side is
    # increasing and convex in z (its second derivative is the variance of a truncated
    # standard normal), so Newton's method from below lands above the root and then
    # descends to it monotonically; Phi(z) in [1/2, 1) keeps the root within log(2).
    level = math.log(1.0 / alpha) + 0.5 * math.log1p(x) - math.log(2.0)
    z = math.sqrt(2.0 * level)
    for _ in range(50):
        cdf = _normal_cdf(z)
        mills = math.exp(-z * z / 2.0) / math.sqrt(2.0 * math.pi) / cdf
        step = (z * z / 2.0 + math.log(cdf) - level) / (z + mills)
        z -= step
        if abs(step) < 1e-12:
            break
    return math.sqrt(w) * z


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def mean_sequence(arm: Arm, alpha: float, tau: float, *, one_sided: bool = False) -> Interval:
    """The confidence sequence for one arm's true mean quality."""
    return Interval(arm.mean, mixture_radius(arm.mean_variance, alpha, tau, one_sided=one_sided))


def difference_sequence(
    variant: Arm, control: Arm, alpha: float, tau: float, *, one_sided: bool = False
) -> Interval:
    """The confidence sequence for (variant - control) from two independent arms.

    The arms may grow at different rates (a 10% variant share): the estimate's variance
    is the sum of the two means' variances, the information both arms carry together.
    """
    v = variant.mean_variance + control.mean_variance
    return Interval(variant.mean - control.mean, mixture_radius(v, alpha, tau, one_sided=one_sided))


def frozen_difference(
    current: Arm, frozen: Arm, alpha: float, tau: float, *, one_sided: bool = False
) -> Interval:
    """The bound on (current - frozen) where `frozen` stopped growing at a data-dependent
    moment (a baseline recorded when an experiment was decided) and `current` keeps
    growing. The frozen arm's mean is only covered by its own confidence sequence (a
    sequence stays valid at any stopping time; a fixed-n interval would not: an
    experiment that stops early tends to stop on a control that looked low), and its
    error does not shrink as `current` grows, so the two radii add up (a union bound,
    alpha / 2 each) rather than combining in quadrature."""
    r = mixture_radius(current.mean_variance, alpha / 2.0, tau, one_sided=one_sided)
    r += mixture_radius(frozen.mean_variance, alpha / 2.0, tau, one_sided=one_sided)
    return Interval(current.mean - frozen.mean, r)
