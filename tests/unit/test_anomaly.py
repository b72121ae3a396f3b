"""The anomaly statistics, the sensitive detector and the conservative triage."""

from __future__ import annotations

import math
import statistics

import pytest

from app.observability.anomaly import (
    Candidate,
    DeploymentStats,
    Moments,
    Period,
    Thresholds,
    detect,
    error_z,
    health_score,
    latency_z,
    quality_z,
    severity_of,
    triage,
)

T = Thresholds(min_samples=20)


def moments(values: list[float]) -> Moments:
    return Moments(len(values), sum(values), sum(v * v for v in values))


def period(latencies: list[float], errors: int = 0, scores: list[float] | None = None) -> Period:
    """`latencies` are the successful requests; `errors` more requests failed."""
    return Period(
        requests=len(latencies) + errors,
        errors=errors,
        latency=moments(latencies),
        quality=moments(scores or []),
    )


def steady(n: int, mean: float = 100.0, spread: float = 10.0) -> list[float]:
    """n latencies around `mean`, alternating +/- spread: std close to `spread`."""
    return [mean + (spread if i % 2 else -spread) for i in range(n)]


def stats(window: Period, baseline: Period, route: str = "r", dep: str = "d") -> DeploymentStats:
    return DeploymentStats(route, dep, window, baseline)


def kinds(found: list[Candidate]) -> set[tuple[str, str]]:
    return {(c.subject, c.kind) for c in found}


def test_moments_match_the_statistics_module() -> None:
    values = [12.0, 15.5, 9.25, 30.0, 11.0, 18.75]
    m = moments(values)
    assert m.mean == pytest.approx(statistics.mean(values))
    assert m.std == pytest.approx(statistics.stdev(values))
    assert Moments().mean == 0.0
    assert Moments(1, 5.0, 25.0).std == 0.0
    # Identical values: rounding may push the variance below zero; the std stays 0.
    assert moments([0.1] * 1000).std == pytest.approx(0.0, abs=1e-6)


def test_latency_z_is_window_mean_minus_baseline_mean_over_baseline_std() -> None:
    baseline = period(steady(100, 100.0, 20.0))
    window = period(steady(30, 160.0, 20.0))
    z = latency_z(stats(window, baseline), T)
    assert z == pytest.approx(60.0 / baseline.latency.std)
    assert 2.9 < (z or 0.0) < 3.1  # std ~20.1 ms


def test_latency_std_is_floored() -> None:
    # 3 +/- 0.1 ms: without the 10 ms floor, 5 ms would be z = 20.
    tight = stats(period(steady(30, 5.0, 0.1)), period(steady(100, 3.0, 0.1)))
    assert latency_z(tight, T) == pytest.approx(0.2)
    # A 1 s baseline: the floor is 10% of its mean, 100 ms.
    slow = stats(period(steady(30, 1200.0, 1.0)), period(steady(100, 1000.0, 1.0)))
    assert latency_z(slow, T) == pytest.approx(2.0)


def test_no_score_under_the_minimum_sample() -> None:
    spike = stats(period(steady(3, 5000.0), errors=3), period(steady(100)))
    assert latency_z(spike, T) is None
    assert error_z(spike, T) is None
    assert detect([spike], T) == []
    # The baseline needs the minimum sample too (for latency).
    assert latency_z(stats(period(steady(30, 5000.0)), period(steady(19))), T) is None


def test_error_z_uses_a_floored_binomial_std() -> None:
    clean = period(steady(200))
    # 10 errors in 50 = 20% against 0%: the std floors at 0.02, so z = 0.2 / 0.02 = 10.
    assert error_z(stats(period(steady(40), errors=10), clean), T) == pytest.approx(10.0)
    # Against a 10% baseline the binomial std for n = 100 is sqrt(0.09 / 100) = 0.03.
    noisy = period(steady(180), errors=20)
    z = error_z(stats(period(steady(75), errors=25), noisy), T)
    assert z == pytest.approx((0.25 - 0.10) / math.sqrt(0.1 * 0.9 / 100))
    # One error in 40 against a clean baseline is not even a candidate.
    assert error_z(stats(period(steady(39), errors=1), clean), T) == pytest.approx(1.25)


def test_errors_without_a_baseline_are_measured_against_the_floor() -> None:
    new = stats(period(steady(10), errors=20), Period())
    assert error_z(new, T) == pytest.approx((20 / 30) / 0.02)
    assert {c.kind for c in detect([new], T)} == {"error_burst"}


def test_quality_z_counts_drops_only() -> None:
    good = [0.9, 1.0] * 20
    bad = [0.3, 0.5] * 15
    drop = stats(period(steady(30), scores=bad), period(steady(100), scores=good))
    assert quality_z(drop, T) == pytest.approx((0.95 - 0.4) / 0.1)
    better = stats(period(steady(30), scores=good), period(steady(100), scores=bad))
    assert (quality_z(better, T) or 0.0) < 0
    assert [c.kind for c in detect([better], T)] == []
    # No feedback at all: nothing to say.
    assert quality_z(stats(period(steady(30)), period(steady(100))), T) is None


@pytest.mark.parametrize(
    ("z", "severity"),
    [
        (2.0, "low"),
        (2.99, "low"),
        (3.0, "medium"),
        (4.9, "medium"),
        (5.0, "high"),
        (8.0, "critical"),
    ],
)
def test_severity_bands(z: float, severity: str) -> None:
    assert severity_of(z) == severity


def test_health_score() -> None:
    assert health_score(0.0, 0.0) == 100.0
    assert health_score(0.0, -3.0) == 100.0  # faster than usual costs nothing
    assert health_score(0.1, 2.0) == 100.0 - 20.0 - 10.0
    assert health_score(0.5, None) == 40.0  # the error penalty caps at 60
    assert health_score(1.0, 50.0) == 0.0  # and the latency one at 40


def test_a_latency_spike_is_one_critical_candidate_with_its_z() -> None:
    baseline = period(steady(100, 100.0, 10.0))
    spiky = stats(period(steady(26, 400.0, 10.0)), baseline, dep="slow")
    calm = stats(period(steady(26, 101.0, 10.0)), baseline, dep="fast")
    found = detect([calm, spiky], T)
    assert [(c.subject, c.kind, c.severity) for c in found] == [
        ("r/slow", "latency_spike", "critical")
    ]
    c = found[0]
    assert c.z == pytest.approx(300.0 / baseline.latency.std, abs=0.01)
    assert (c.value, c.baseline) == (400.0, 100.0)
    assert c.health == 60.0  # z ~ 30: the latency penalty is capped at 40
    assert "z=" in c.message
    assert c.details["window_samples"] == 26


def test_stagnation_needs_baseline_share_and_route_traffic() -> None:
    both = period(steady(100))
    silent = stats(Period(), both, dep="a")
    busy = stats(period(steady(60)), both, dep="b")
    found = detect([silent, busy], T)
    assert kinds(found) == {("r/a", "stagnation")}
    # Half of 60 due, none came: z = sqrt(30), high (never critical).
    assert found[0].z == pytest.approx(math.sqrt(30), abs=0.01)
    assert found[0].severity == "high"
    # The whole route quiet (night, consolidation down): no stagnation.
    assert detect([silent, stats(Period(), both, dep="b")], T) == []
    # A deployment that carried 5% of the baseline going quiet is not stagnation.
    minor = stats(Period(), period(steady(20)), dep="a")
    major = stats(period(steady(400)), period(steady(380)), dep="b")
    assert detect([minor, major], T) == []
    # Far more due than a high: still capped at high.
    huge = detect([stats(Period(), both, dep="a"), stats(period(steady(5000)), both)], T)
    assert [c.severity for c in huge] == ["high"]


def cand(kind: str, severity: str, subject: str = "r/d") -> Candidate:
    route, dep = subject.split("/")
    z = {"low": 2.5, "medium": 4.0, "high": 6.0, "critical": 9.0}[severity]
    return Candidate(route, dep, kind, severity, z, 1.0, 0.0, None, "m")  # type: ignore[arg-type]


def test_triage_dismisses_low_and_escalates_high_and_critical() -> None:
    found = [
        cand("latency_spike", "low", "r/a"),
        cand("latency_spike", "high", "r/b"),
        cand("error_burst", "critical", "r/c"),
    ]
    t = triage(found, previous=set())
    assert [c.subject for c in t.escalated] == ["r/b", "r/c"]
    assert [c.subject for c in t.dismissed] == ["r/a"]
    assert t.held == []
    assert t.seen == {("r/b", "latency_spike"), ("r/c", "error_burst")}


def test_medium_escalates_only_when_seen_at_the_previous_tick() -> None:
    first = triage([cand("quality_drop", "medium")], previous=set())
    assert first.escalated == []
    assert [c.kind for c in first.held] == ["quality_drop"]
    second = triage([cand("quality_drop", "medium")], previous=first.seen)
    assert [c.kind for c in second.escalated] == ["quality_drop"]
    # Another kind on the same subject did not persist: still held.
    other = triage([cand("latency_spike", "medium")], previous=first.seen)
    assert other.escalated == []
    assert len(other.held) == 1
    # A low at the previous tick does not count as persistence.
    low_then = triage([cand("quality_drop", "low")], previous=set())
    assert triage([cand("quality_drop", "medium")], previous=low_then.seen).escalated == []
