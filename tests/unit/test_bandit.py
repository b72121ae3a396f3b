"""The routing bandit's pieces: reward, posterior, P(best), floor, guardrails, drift, output."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence

import pytest

from app.config import Settings
from app.cycle.bandit import (
    COST_SENSITIVITY,
    LATENCY_PENALTY_MAX,
    PRIOR_SD,
    ArmEvidence,
    BanditConfig,
    Posterior,
    RouteDecision,
    apply_floor,
    decide,
    detect_drift,
    guardrail,
    latency_penalty,
    probability_best,
    quality_posterior,
    reward,
)
from app.cycle.evidence import EMPTY, Bucket, summarize
from app.routing.config import CycleConfig

HALF_LIFE_S = 6 * 3600.0
NOW = 10_000.0


def bucket(
    start: float,
    scores: Sequence[float],
    *,
    cost: float = 0.001,
    latency_ms: float = 400.0,
    errors: int = 0,
) -> Bucket:
    b = Bucket(start)
    for i, q in enumerate(scores):
        b.add(quality=q, cost=cost, latency_ms=latency_ms, error=i < errors)
    return b


def pattern(mean: float, n: int) -> list[float]:
    """n pass/fail scores with the given mean, spread evenly (no randomness needed)."""
    return [1.0 if math.floor((i + 1) * mean) > math.floor(i * mean) else 0.0 for i in range(n)]


def evidence(
    name: str, *buckets: Bucket, recent_start: float = NOW - 300.0, **kw: float
) -> ArmEvidence:
    return ArmEvidence.from_buckets(
        name, list(buckets), now=NOW, half_life_s=HALF_LIFE_S, recent_start=recent_start, **kw
    )


def steady(
    name: str, mean: float, n: int = 600, *, cost: float = 0.001, latency_ms: float = 400.0
) -> ArmEvidence:
    """An arm with `n` scores of mean `mean` over the last 50 minutes, spread evenly."""
    scores, per = pattern(mean, n), n // 10
    buckets = [
        bucket(
            NOW - 300.0 * (10 - i),
            scores[i * per : (i + 1) * per],
            cost=cost,
            latency_ms=latency_ms,
        )
        for i in range(10)
    ]
    return evidence(name, *buckets)


# -- reward -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cheap", "dear"),
    [((0.95, 0.001), (0.97, 0.005)), ((0.90, 0.0001), (0.95, 0.002))],
)
def test_cost_sensitivity_trades_quality_for_cost_by_policy(
    cheap: tuple[float, float], dear: tuple[float, float]
) -> None:
    def winner(policy: str) -> str:
        r_cheap = reward(*cheap, policy=policy)  # type: ignore[arg-type]
        r_dear = reward(*dear, policy=policy)  # type: ignore[arg-type]
        return "cheap" if r_cheap > r_dear else "dear"

    assert winner("cost_optimized") == "cheap"
    assert winner("quality_optimized") == "dear"
    assert (
        COST_SENSITIVITY["cost_optimized"]
        < COST_SENSITIVITY["balanced"]
        < COST_SENSITIVITY["quality_optimized"]
    )


def test_latency_penalty_starts_at_the_budget_and_is_bounded() -> None:
    assert latency_penalty(900.0, 1000.0) == 0.0
    assert latency_penalty(1000.0, 1000.0) == 0.0
    assert latency_penalty(1500.0, 1000.0) == pytest.approx(LATENCY_PENALTY_MAX / 2)
    assert latency_penalty(60_000.0, 1000.0) == LATENCY_PENALTY_MAX
    assert latency_penalty(60_000.0, None) == 0.0
    assert latency_penalty(None, 1000.0) == 0.0
    slow = reward(0.9, 0.0, 3000.0, policy="balanced", latency_budget_ms=1000.0)
    assert slow == pytest.approx(0.9 - LATENCY_PENALTY_MAX)


# -- posterior and P(best) ----------------------------------------------------------------


def test_posterior_with_no_data_is_the_weak_prior() -> None:
    assert quality_posterior(EMPTY, 0.9) == Posterior(0.9, PRIOR_SD)


def test_posterior_narrows_with_evidence_but_few_scores_are_not_certainty() -> None:
    few = quality_posterior(summarize([bucket(NOW, [1.0] * 5)], NOW, HALF_LIFE_S), 0.9)
    assert few.stderr > 0.04  # five perfect scores: a sample variance of 0, not proof
    many = quality_posterior(summarize([bucket(NOW, pattern(0.95, 2000))], NOW, HALF_LIFE_S), 0.5)
    assert many.mean == pytest.approx(0.95, abs=0.002)  # the prior no longer matters
    assert many.stderr < 0.006


def test_probability_best_is_a_distribution_and_seeded() -> None:
    posteriors = {"a": Posterior(0.90, 0.02), "b": Posterior(0.91, 0.02), "c": Posterior(0.5, 0.01)}
    p = probability_best(posteriors, random.Random(3))
    assert sum(p.values()) == pytest.approx(1.0)
    assert p["c"] == 0.0
    assert 0.25 < p["a"] < p["b"] < 0.75
    assert p == probability_best(posteriors, random.Random(3))
    assert probability_best({"only": Posterior(0.1, 1.0)}, random.Random(0)) == {"only": 1.0}


# -- floor ------------------------------------------------------------------------------


def test_floor_is_shared_by_the_arms_that_are_not_best() -> None:
    w = apply_floor({"a": 1.0, "b": 0.0, "c": 0.0}, 0.025)
    assert w == pytest.approx({"a": 0.95, "b": 0.025, "c": 0.025})
    w = apply_floor({"a": 0.6, "b": 0.39, "c": 0.01}, 0.025)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["c"] == pytest.approx(0.025)
    assert w["a"] / w["b"] == pytest.approx(0.6 / 0.39)  # the rest stays proportional


def test_pinned_arms_get_exactly_the_floor() -> None:
    w = apply_floor({"a": 0.9, "b": 0.1}, 0.05, pinned={"a"})
    assert w == pytest.approx({"a": 0.05, "b": 0.95})
    assert apply_floor({"a": 1.0, "b": 1.0}, 0.05, pinned={"a", "b"}) == {"a": 0.5, "b": 0.5}
    assert apply_floor({"a": 0.0, "b": 0.0}, 0.9) == {"a": 0.5, "b": 0.5}  # floor ≤ 1/k
    assert apply_floor({}, 0.1) == {}


# -- decide ------------------------------------------------------------------------------


def test_without_evidence_the_configured_weights_stand() -> None:
    arms = [
        ArmEvidence("a", EMPTY, configured_weight=3.0),
        ArmEvidence("b", EMPTY, configured_weight=1.0),
    ]
    d = decide("r", arms, BanditConfig(), random.Random(0))
    assert d.evidence == 0.0
    assert d.weights == pytest.approx({"a": 0.75, "b": 0.25})


def test_thin_evidence_hands_over_gradually() -> None:
    config = BanditConfig(min_observations=100)
    arms = [steady("good", 0.97, 30), steady("bad", 0.60, 20)]  # 50 of 100 scores
    d = decide("r", arms, config, random.Random(0))
    assert d.evidence == pytest.approx(0.5, abs=0.05)  # decayed counts: a little under
    # Part uniform (0.5 each), part P(best) ≈ 1.
    expected = d.evidence * 1.0 + (1.0 - d.evidence) * 0.5
    assert d.weights["good"] == pytest.approx(expected, abs=0.01)
    full = decide("r", [steady("good", 0.97), steady("bad", 0.60)], config, random.Random(0))
    assert full.evidence == 1.0
    assert full.weights["good"] == pytest.approx(0.95)
    assert full.best == "good"


def test_decisions_are_deterministic_for_a_seed() -> None:
    arms = [steady("a", 0.95), steady("b", 0.955), steady("c", 0.90)]
    first = decide("r", arms, BanditConfig(), random.Random(11))
    assert first == decide("r", arms, BanditConfig(), random.Random(11))
    assert sum(first.weights.values()) == pytest.approx(1.0)
    assert min(first.weights.values()) >= 0.025 - 1e-12


def test_policy_decides_between_cheap_and_good() -> None:
    arms = [steady("cheap", 0.95, cost=0.001), steady("dear", 0.97, cost=0.005)]
    cost = decide("r", arms, BanditConfig(policy="cost_optimized"), random.Random(1))
    quality = decide("r", arms, BanditConfig(policy="quality_optimized"), random.Random(1))
    assert cost.best == "cheap"
    assert quality.best == "dear"


def test_a_single_deployment_takes_everything() -> None:
    d = decide("r", [steady("only", 0.5)], BanditConfig(), random.Random(0))
    assert d.weights == {"only": 1.0}


# -- guardrails ----------------------------------------------------------------------------


def test_error_guardrail_needs_the_rate_clearly_over_budget() -> None:
    config = BanditConfig(error_rate_budget=0.05)
    noisy = evidence("a", bucket(NOW - 300, [1.0] * 20, errors=3))  # 15% of 20: noise
    assert guardrail(noisy, config) is None
    broken = evidence("a", bucket(NOW - 300, [1.0] * 60, errors=12))
    assert guardrail(broken, config) == "error_rate"
    few = evidence("a", bucket(NOW - 300, [1.0] * 10, errors=10))
    assert guardrail(few, config) is None  # too few requests to judge


def test_latency_guardrail_sends_the_best_quality_to_the_floor() -> None:
    config = BanditConfig(latency_budget_ms=2000.0, policy="quality_optimized")
    arms = [steady("slow", 0.99, latency_ms=4000.0), steady("ok", 0.90), steady("meh", 0.85)]
    assert guardrail(arms[0], config) == "p95_latency"
    d = decide("r", arms, config, random.Random(0))
    slow = next(a for a in d.arms if a.name == "slow")
    assert slow.guardrail == "p95_latency"
    assert slow.weight == pytest.approx(0.025)
    assert d.best == "ok"
    assert not d.guardrails_waived


def test_when_every_arm_is_over_budget_the_guardrails_stand_down() -> None:
    config = BanditConfig(latency_budget_ms=100.0)
    arms = [steady("a", 0.97, latency_ms=400.0), steady("b", 0.80, latency_ms=400.0)]
    d = decide("r", arms, config, random.Random(0))
    assert d.guardrails_waived
    assert d.best == "a"
    assert d.weights["a"] > 0.9


# -- drift ---------------------------------------------------------------------------------


def drifting(recent_mean: float, n_recent: int = 90) -> ArmEvidence:
    old = [bucket(NOW - 300.0 * (10 - i), pattern(0.97, 100)) for i in range(9)]
    return evidence("a", *old, bucket(NOW - 300.0, pattern(recent_mean, n_recent)))


def test_drift_detects_a_significant_drop() -> None:
    arm = drifting(0.80)
    drift = detect_drift(arm.long_run, arm.recent, since=arm.recent_start)
    assert drift is not None
    assert drift.direction == "drop"
    assert drift.before == pytest.approx(0.97, abs=0.005)
    assert drift.recent == pytest.approx(0.80, abs=0.01)
    assert drift.z > 3
    assert drift.since == NOW - 300.0


def test_no_drift_without_a_real_or_well_measured_change() -> None:
    steady_arm = drifting(0.97)
    assert detect_drift(steady_arm.long_run, steady_arm.recent) is None
    few = drifting(0.80, n_recent=10)
    assert detect_drift(few.long_run, few.recent) is None  # too few recent scores
    better = drifting(1.0)
    assert detect_drift(better.long_run, better.recent) is None  # rises only when asked


def test_a_drifted_arm_is_judged_on_the_recent_window() -> None:
    arms = [drifting(0.80), steady("b", 0.95)]
    config = BanditConfig(policy="quality_optimized")
    d = decide("r", arms, config, random.Random(0))
    a = next(x for x in d.arms if x.name == "a")
    assert a.drift is not None
    assert a.quality == pytest.approx(0.80, abs=0.01)
    assert d.best == "b"
    assert d.drifted == ["a"]
    assert d.resets == {"a": NOW - 300.0}


def test_a_held_down_arm_that_recovers_is_seen_rising() -> None:
    # Reset at a bad window, then a trickle of good scores at the floor.
    bad = bucket(NOW - 300.0 * 10, pattern(0.60, 100))
    trickle = [bucket(NOW - 300.0 * (9 - i), [0.95, 0.96, 0.94, 0.97]) for i in range(9)]
    arm = evidence("a", bad, *trickle, reset_at=NOW - 300.0 * 10)
    assert arm.recent_extended
    assert arm.recent.count >= 30
    drift = detect_drift(arm.long_run, arm.recent, rises=arm.recent_extended)
    assert drift is not None
    assert drift.direction == "rise"

    d = decide("r", [arm, steady("b", 0.90)], BanditConfig(), random.Random(0))
    a = next(x for x in d.arms if x.name == "a")
    assert a.drift is None  # no alert: a recovery
    assert a.recovery is not None
    assert d.drifted == []
    assert d.resets == {"a": arm.recent_start}
    assert a.quality == pytest.approx(0.955, abs=0.01)  # judged on the recovery alone
    assert a.weight > 0.5
    assert RouteDecision.from_dict(json.loads(json.dumps(d.to_dict()))) == d


# -- evidence and output -----------------------------------------------------------------


def test_evidence_reaches_back_for_a_thin_arm_and_forgets_before_a_reset() -> None:
    buckets = [bucket(NOW - 300.0 * (5 - i), pattern(0.9, 10)) for i in range(5)]
    arm = evidence("a", *buckets)
    assert arm.recent.count == 30  # the last interval had 10: two more buckets join
    assert arm.recent_start == NOW - 900.0
    assert arm.long_run.count == 50
    reset = evidence("a", *buckets, reset_at=NOW - 600.0)
    assert reset.long_run.count == 30  # min(reset, recent start): recent stays inside


def test_config_for_a_route_reads_settings_and_cycle_block() -> None:
    settings = Settings(
        _env_file=None,
        flywheel_policy="cost_optimized",
        flywheel_cycle_exploration=0.1,
        flywheel_cycle_min_observations=50,
    )
    config = BanditConfig.for_route(
        settings, CycleConfig(latency_budget_ms=1500.0), error_rate_budget=0.2
    )
    assert config.policy == "cost_optimized"
    assert config.exploration == 0.1
    assert config.min_observations == 50
    assert config.latency_budget_ms == 1500.0
    assert config.error_rate_budget == 0.2


def test_decision_round_trips_through_json() -> None:
    config = BanditConfig(latency_budget_ms=2000.0)
    arms = [drifting(0.80), steady("b", 0.95), steady("c", 0.9, latency_ms=5000.0)]
    d = decide("chat", arms, config, random.Random(5))
    data = json.loads(json.dumps(d.to_dict()))
    assert data["weights"] == d.weights
    assert data["best"] == d.best
    assert RouteDecision.from_dict(data) == d
    assert {a["name"]: a["guardrail"] for a in data["arms"]}["c"] == "p95_latency"
    assert data["arms"][0]["drift"]["direction"] == "drop"
