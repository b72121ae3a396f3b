"""The confidence sequences (`app.cycle.sequential`) and the experiment rules built on them
(`app.cycle.experiment`), on hand-made statistics."""

from __future__ import annotations

import itertools
import json
import math
import random
from statistics import NormalDist

import pytest

from app.config import Settings
from app.cycle.evidence import EMPTY, Bucket, summarize
from app.cycle.experiment import (
    RULE_FUTILITY,
    RULE_HELD,
    RULE_IMPROVEMENT,
    RULE_MAX_SAMPLE,
    RULE_MIN_SAMPLE,
    RULE_SUPERSEDED,
    RULE_UNDECIDED,
    RULE_WATCHING,
    RULE_WORSE,
    ExperimentPolicy,
    Verdict,
    WatchVerdict,
    decide,
    watch,
)
from app.cycle.sequential import (
    Arm,
    Interval,
    difference_sequence,
    frozen_difference,
    mean_sequence,
    mixture_radius,
)

TAU = 0.03
POLICY = ExperimentPolicy()


def arm(n: float, mean: float) -> Arm:
    """An arm of Bernoulli-like scores: the variance of a 0/1 score of that mean."""
    return Arm(n, mean, mean * (1 - mean))


# --- The boundary ---------------------------------------------------------------------


@pytest.mark.parametrize("one_sided", [False, True])
def test_radius_narrows_as_data_accumulates(one_sided: bool) -> None:
    radii = [mixture_radius(0.2 / n, 0.05, TAU, one_sided=one_sided) for n in range(10, 50_000, 97)]
    assert all(a > b for a, b in itertools.pairwise(radii))
    assert mixture_radius(0.0, 0.05, TAU) == 0.0
    assert mixture_radius(math.inf, 0.05, TAU) == math.inf


@pytest.mark.parametrize("one_sided", [False, True])
def test_boundary_on_the_sum_grows_with_n(one_sided: bool) -> None:
    # In sum units (n x radius) the boundary grows like sqrt(n log n): monotone in n.
    sums = [
        n * mixture_radius(0.2 / n, 0.05, TAU, one_sided=one_sided) for n in range(10, 50_000, 97)
    ]
    assert all(a < b for a, b in itertools.pairwise(sums))


def test_radius_costs_only_a_log_factor_over_a_fixed_n_interval() -> None:
    z = NormalDist().inv_cdf(0.975)
    for n in (200, 2_000, 20_000):
        v = 0.2 / n
        fixed = z * math.sqrt(v)
        assert fixed < mixture_radius(v, 0.05, TAU) < 2.2 * fixed


def test_radius_grows_with_confidence() -> None:
    v = 1e-4
    radii = [mixture_radius(v, a, TAU) for a in (0.2, 0.1, 0.05, 0.01, 0.001)]
    assert radii == sorted(radii)


def test_one_sided_bound_lies_between_two_sided_at_alpha_and_at_twice_alpha() -> None:
    for v in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        one = mixture_radius(v, 0.025, TAU, one_sided=True)
        assert mixture_radius(v, 0.05, TAU) < one < mixture_radius(v, 0.025, TAU)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        mixture_radius(1e-3, 0.0, TAU)
    with pytest.raises(ValueError, match="alpha"):
        mixture_radius(1e-3, 0.5, TAU)
    with pytest.raises(ValueError, match="tau"):
        mixture_radius(1e-3, 0.05, 0.0)


def test_gaussian_walk_crosses_the_one_sided_boundary_rarely() -> None:
    """The always-valid property itself: looking after every observation, for 400 of
    them, a null Gaussian mean crosses the alpha = 5% one-sided boundary at most ~5% of
    the time (a fixed-n 5% bound would be crossed some time by about half the walks)."""
    rng = random.Random(7)
    alpha, paths, steps = 0.05, 500, 400
    radii = [mixture_radius(1.0 / n, alpha, 0.3, one_sided=True) for n in range(1, steps + 1)]
    crossed = naive = 0
    z = NormalDist().inv_cdf(1 - alpha)
    for _ in range(paths):
        total = 0.0
        hit = naive_hit = False
        for n in range(1, steps + 1):
            total += rng.gauss(0.0, 1.0)
            hit = hit or total / n > radii[n - 1]
            naive_hit = naive_hit or total / math.sqrt(n) > z
        crossed += hit
        naive += naive_hit
    assert crossed / paths <= alpha
    assert naive / paths > 2 * alpha


def test_difference_interval_is_symmetric_and_antisymmetric_in_the_arms() -> None:
    a, b = arm(900, 0.9), arm(1_100, 0.86)
    ab = difference_sequence(a, b, 0.05, TAU)
    ba = difference_sequence(b, a, 0.05, TAU)
    assert ab.estimate == pytest.approx(0.04)
    assert ab.high - ab.estimate == pytest.approx(ab.estimate - ab.low)
    assert ba.estimate == pytest.approx(-ab.estimate)
    assert (ba.low, ba.high) == pytest.approx((-ab.high, -ab.low))


def test_more_data_narrows_the_difference_and_the_mean() -> None:
    narrow = difference_sequence(arm(4_000, 0.9), arm(4_000, 0.85), 0.05, TAU)
    wide = difference_sequence(arm(400, 0.9), arm(400, 0.85), 0.05, TAU)
    assert narrow.radius < wide.radius
    assert (
        mean_sequence(arm(4_000, 0.9), 0.05, TAU).radius
        < mean_sequence(arm(400, 0.9), 0.05, TAU).radius
    )
    # A 10% share: information adds up from both arms, the small one dominating.
    skewed = difference_sequence(arm(400, 0.9), arm(3_600, 0.85), 0.05, TAU)
    assert narrow.radius < skewed.radius < wide.radius


def test_frozen_difference_adds_both_radii() -> None:
    current, frozen = arm(1_000, 0.8), arm(2_000, 0.85)
    bound = frozen_difference(current, frozen, 0.05, TAU, one_sided=True)
    assert bound.estimate == pytest.approx(-0.05)
    assert bound.radius == pytest.approx(
        mean_sequence(current, 0.025, TAU, one_sided=True).radius
        + mean_sequence(frozen, 0.025, TAU, one_sided=True).radius
    )
    # The frozen side's error stays however long the current side grows.
    huge = frozen_difference(arm(10**9, 0.8), frozen, 0.05, TAU, one_sided=True)
    frozen_radius = mean_sequence(frozen, 0.025, TAU, one_sided=True).radius
    assert huge.radius == pytest.approx(frozen_radius, abs=1e-4)


# --- Arms -------------------------------------------------------------------------------


def test_arm_from_buckets_and_summaries() -> None:
    buckets = [
        Bucket(start=0.0, requests=100, scored=100, q_sum=80.0, q_sq=80.0),
        Bucket(start=300.0, requests=50, scored=40, q_sum=36.0, q_sq=36.0),
    ]
    a = Arm.from_buckets(buckets)
    assert a.n == 140
    assert a.mean == pytest.approx(116 / 140)
    assert a.variance == pytest.approx((116 / 140) * (24 / 140) * 140 / 139)
    # No decay, however old the buckets: every score weighs the same.
    assert Arm.from_summary(summarize(buckets, 10**9, math.inf)) == a
    assert Arm.from_summary(EMPTY) == Arm(0.0, 0.0, 0.0)
    assert Arm.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_identical_scores_do_not_claim_zero_noise() -> None:
    perfect = Arm(200, 1.0, 0.0)
    assert 0.0 < perfect.guarded_variance < 0.25 / 200
    assert mean_sequence(perfect, 0.05, TAU).radius > 0.0
    assert Arm(0, 0.0, 0.0).mean_variance == math.inf


def test_interval_to_dict_handles_an_empty_arm() -> None:
    assert Interval(0.0, math.inf).to_dict() == {
        "estimate": 0.0,
        "radius": None,
        "low": None,
        "high": None,
    }


# --- Experiment decisions ------------------------------------------------------------


def test_below_min_sample_nothing_is_decided() -> None:
    decision = decide(arm(199, 0.5), {"v": arm(199, 1.0)}, POLICY)
    (c,) = decision.comparisons
    assert (c.verdict, c.rule) == (Verdict.CONTINUE, RULE_MIN_SAMPLE)
    assert c.interval.low > POLICY.min_improvement  # significant, but too early
    assert decision.winner is None
    assert not decision.finished
    # Either arm short is enough to wait.
    assert decide(arm(5_000, 0.5), {"v": arm(150, 1.0)}, POLICY).verdict("v") is Verdict.CONTINUE


def test_promotes_a_clear_improvement_beyond_the_minimum() -> None:
    decision = decide(arm(3_000, 0.85), {"v": arm(3_000, 0.90)}, POLICY)
    (c,) = decision.comparisons
    assert (c.verdict, c.rule) == (Verdict.PROMOTE, RULE_IMPROVEMENT)
    assert c.interval.low > POLICY.min_improvement
    assert decision.winner == "v"
    assert decision.finished


def test_significant_but_smaller_than_min_improvement_is_not_promoted() -> None:
    # +1.5 points on a huge sample: certainly better, but not by 2 points.
    decision = decide(arm(19_000, 0.85), {"v": arm(19_000, 0.865)}, POLICY)
    (c,) = decision.comparisons
    assert c.interval.low > 0.0
    assert c.verdict is not Verdict.PROMOTE
    assert decision.winner is None


def test_futility_retires_a_variant_that_cannot_reach_the_minimum() -> None:
    decision = decide(arm(8_000, 0.85), {"v": arm(8_000, 0.85)}, POLICY)
    (c,) = decision.comparisons
    assert (c.verdict, c.rule) == (Verdict.RETIRE, RULE_FUTILITY)
    assert c.interval.high < POLICY.min_improvement
    assert decision.finished
    assert decision.winner is None


def test_max_sample_makes_it_inconclusive() -> None:
    policy = ExperimentPolicy(max_sample=5_000)
    # Straddling: could be 2 points better, could be less.
    undecided = decide(arm(4_900, 0.85), {"v": arm(4_900, 0.87)}, policy)
    assert undecided.comparisons[0].rule == RULE_UNDECIDED
    assert undecided.comparisons[0].verdict is Verdict.CONTINUE
    done = decide(arm(5_000, 0.85), {"v": arm(5_000, 0.87)}, policy)
    assert (done.comparisons[0].verdict, done.comparisons[0].rule) == (
        Verdict.INCONCLUSIVE,
        RULE_MAX_SAMPLE,
    )
    assert done.finished
    assert done.winner is None
    # The max is per arm: a big control alone does not end a small variant's test.
    assert decide(arm(50_000, 0.85), {"v": arm(4_900, 0.87)}, policy).verdict("v") is (
        Verdict.CONTINUE
    )


def test_bonferroni_divides_alpha_among_the_variants() -> None:
    # An improvement significant for one variant at 5% but not at 5% / 3.
    control, variant = arm(1_500, 0.85), arm(1_500, 0.905)
    alone = decide(control, {"v": variant}, POLICY)
    assert alone.comparisons[0].alpha == pytest.approx(0.05)
    assert alone.winner == "v"
    three = decide(control, {"v": variant, "w": arm(1_500, 0.85), "x": arm(1_500, 0.84)}, POLICY)
    assert all(c.alpha == pytest.approx(0.05 / 3) for c in three.comparisons)
    assert three.verdict("v") is Verdict.CONTINUE
    assert three.winner is None
    # The divisor is the experiment's size, not how many variants are still running.
    later = decide(control, {"v": variant}, POLICY, family_size=3)
    assert later.family_size == 3
    assert later.comparisons[0].alpha == pytest.approx(0.05 / 3)
    assert later.winner is None


def test_at_most_one_winner_the_best_significant_one() -> None:
    control = arm(5_000, 0.80)
    decision = decide(
        control,
        {"good": arm(5_000, 0.86), "best": arm(5_000, 0.90), "meh": arm(5_000, 0.81)},
        POLICY,
    )
    assert decision.winner == "best"
    assert decision.verdict("best") is Verdict.PROMOTE
    good = next(c for c in decision.comparisons if c.variant == "good")
    assert (good.verdict, good.rule) == (Verdict.RETIRE, RULE_SUPERSEDED)
    assert good.significant
    assert decision.verdict("meh") is Verdict.RETIRE
    assert decision.finished
    assert [c.verdict for c in decision.comparisons].count(Verdict.PROMOTE) == 1
    with pytest.raises(KeyError):
        decision.verdict("nope")


def test_decision_to_dict_is_json_with_every_statistic() -> None:
    decision = decide(arm(3_000, 0.85), {"v": arm(3_000, 0.90), "w": arm(100, 0.5)}, POLICY)
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["kind"] == "experiment"
    assert data["winner"] == "v"
    assert data["family_size"] == 2
    assert data["alpha"] == pytest.approx(0.05)
    assert data["policy"] == {
        "min_sample": 200,
        "min_improvement": 0.02,
        "confidence": 0.95,
        "max_sample": 20_000,
        "watch_sample": 5_000,
        "mixture_scale": 0.03,
    }
    v, w = data["comparisons"]
    assert v["verdict"] == "promote"
    assert v["rule"] == RULE_IMPROVEMENT
    assert v["variant_arm"] == {"n": 3000.0, "mean": 0.9, "variance": pytest.approx(0.09)}
    assert v["control_arm"]["mean"] == 0.85
    assert v["difference"]["estimate"] == pytest.approx(0.05)
    assert v["difference"]["low"] == pytest.approx(0.05 - v["difference"]["radius"])
    assert v["alpha"] == pytest.approx(0.025)
    assert w["verdict"] == "retire"
    assert w["rule"] == RULE_SUPERSEDED


def test_policy_from_settings_and_validation() -> None:
    settings = Settings(
        flywheel_experiment_min_sample=300,
        flywheel_experiment_min_improvement=0.03,
        flywheel_experiment_confidence=0.9,
        flywheel_experiment_max_sample=100,
    )
    policy = ExperimentPolicy.from_settings(settings)
    assert (policy.min_sample, policy.min_improvement, policy.max_sample) == (300, 0.03, 300)
    assert policy.alpha == pytest.approx(0.1)
    assert policy.tau == pytest.approx(0.045)
    assert policy.watch_n == 300  # capped at max_sample
    assert ExperimentPolicy(min_improvement=0.0).tau == 0.015
    assert ExperimentPolicy(mixture_scale=0.05, watch_sample=123).to_dict()["mixture_scale"] == 0.05
    for bad in (
        {"min_sample": 0},
        {"min_sample": 500, "max_sample": 400},
        {"confidence": 1.0},
        {"min_improvement": -0.1},
        {"mixture_scale": 0.0},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own field
            ExperimentPolicy(**bad)


# --- The watch after a promotion -----------------------------------------------------


def test_watch_waits_for_min_sample_then_rolls_back_a_regression() -> None:
    baseline = arm(3_000, 0.85)
    early = watch(arm(150, 0.5), baseline, POLICY)
    assert (early.verdict, early.rule) == (WatchVerdict.WATCH, RULE_MIN_SAMPLE)
    worse = watch(arm(1_000, 0.77), baseline, POLICY)
    assert (worse.verdict, worse.rule) == (WatchVerdict.ROLLBACK, RULE_WORSE)
    assert worse.interval.high < 0.0
    assert worse.interval.estimate == pytest.approx(-0.08)


def test_watch_keeps_what_holds_after_the_watch_sample() -> None:
    baseline = arm(3_000, 0.85)
    watching = watch(arm(1_000, 0.84), baseline, POLICY)
    assert (watching.verdict, watching.rule) == (WatchVerdict.WATCH, RULE_WATCHING)
    kept = watch(arm(POLICY.watch_n, 0.84), baseline, POLICY)
    assert (kept.verdict, kept.rule) == (WatchVerdict.KEEP, RULE_HELD)
    # A small but significant drop is still rolled back at the end of the watch.
    dropped = watch(arm(POLICY.watch_n, 0.80), arm(20_000, 0.85), POLICY)
    assert dropped.verdict is WatchVerdict.ROLLBACK


def test_watch_to_dict_stores_the_frozen_baseline() -> None:
    baseline = Arm.from_dict({"n": 2_000, "mean": 0.85, "variance": 0.1275})
    data = json.loads(json.dumps(watch(arm(800, 0.7), baseline, POLICY).to_dict()))
    assert data["kind"] == "watch"
    assert data["verdict"] == "rollback"
    assert data["rule"] == RULE_WORSE
    assert data["baseline_arm"] == {"n": 2000.0, "mean": 0.85, "variance": 0.1275}
    assert data["promoted_arm"]["n"] == 800.0
    assert data["difference"]["high"] < 0
    assert data["alpha"] == pytest.approx(0.05)
