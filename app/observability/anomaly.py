"""Anomaly detection over each deployment's recent traffic: pure statistics, no I/O.

Every evaluation compares a deployment's last *window* (default 5 min) with its own
*baseline*, the period just before the window (default 1 h). Two layers decide:

- the **detector** is sensitive: any signal at z >= 2 becomes a candidate, with a
  severity from its z-score (low < 3 <= medium < 5 <= high < 8 <= critical);
- the **triage** is conservative: low is dismissed, high and critical are escalated,
  and medium is held, escalating only when the same (subject, kind) is a candidate again
  at the next evaluation (a blip that one tick shows and the next does not is noise).

Signals (a subject is "route/deployment"):

- latency_spike: z = (window mean - baseline mean) / baseline std, over successful
  requests. The std is floored at max(10 ms, 10% of the baseline mean): a deployment
  that answered in 3 +/- 0.2 ms would otherwise call 4 ms a spike.
- error_burst: z = (window rate - baseline rate) / binomial std of a window of n at the
  baseline rate; the rate is floored at 1% and the std at 0.02, so a clean baseline
  does not turn one error into an alarm. With no baseline a deployment is assumed
  healthy (the floor rate): a new deployment failing every request is still a burst.
  Errors are what the deployment is answerable for: 5xx, 408 and 429; other 4xx are
  the client's own.
- quality_drop: z = (baseline mean - window mean) / baseline std of feedback scores
  ([0, 1]), std floored at 0.1.
- stagnation: the deployment carried traffic in the baseline (at least the minimum
  sample and 10% of its route's) but got none in the window while its route got at
  least the minimum sample: an open breaker, a weight collapsed to zero, a config slip.
  z = sqrt(expected), expected = its baseline share x the route's window count (the
  z of observing 0 where a Poisson count of that mean was due). Capped at high.

Every signal needs the minimum sample (default 20) in both the window and the
baseline: no alert on 3 requests.

Health score (0-100, for operators and the alert): 100 minus an error penalty of
200 x the window's error rate (capped at 60: 30% errors costs 60 points) minus a
latency penalty of 5 x the latency z when positive (capped at 40: z = 8 costs 40).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Severity = Literal["low", "medium", "high", "critical"]
Kind = Literal[
    "latency_spike",
    "error_burst",
    "quality_drop",
    "stagnation",
    # Raised by the virtuous cycle's monitor (thresholds and budgets, not z-scores).
    "quality_critical",
    "quality_warning",
    "latency_budget",
    "error_budget",
    "cost_budget",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
# Lower bounds of medium, high and critical on the z scale; under the first: low.
SEVERITY_Z = (3.0, 5.0, 8.0)


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_samples: int = 20
    candidate_z: float = 2.0  # the detector's sensitivity
    latency_std_floor_ms: float = 10.0
    latency_std_floor_ratio: float = 0.10
    error_rate_floor: float = 0.01
    error_std_floor: float = 0.02
    quality_std_floor: float = 0.10
    stagnation_min_share: float = 0.10


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, sum and sum of squares: all a database must return for a mean and a std."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def std(self) -> float:
        """The sample std; 0 under two values. Rounding can make the variance slightly
        negative when every value is the same, hence the clamp."""
        if self.n < 2:
            return 0.0
        variance = (self.squares - self.total * self.total / self.n) / (self.n - 1)
        return math.sqrt(max(0.0, variance))


@dataclass(frozen=True, slots=True)
class Period:
    """One deployment over one period: requests, errors, successful latencies, feedback."""

    requests: int = 0
    errors: int = 0
    latency: Moments = Moments()
    quality: Moments = Moments()

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class DeploymentStats:
    route: str
    deployment: str
    window: Period
    baseline: Period

    @property
    def subject(self) -> str:
        return f"{self.route}/{self.deployment}"


@dataclass(frozen=True, slots=True)
class Candidate:
    route: str
    deployment: str
    kind: Kind
    severity: Severity
    z: float
    value: float  # the window's figure (ms, rate, mean score, requests)
    baseline: float  # the baseline's (for stagnation: the requests expected)
    health: float | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"{self.route}/{self.deployment}"

    @property
    def key(self) -> tuple[str, str]:
        return self.subject, self.kind


@dataclass(frozen=True, slots=True)
class Triage:
    escalated: list[Candidate]
    held: list[Candidate]  # medium, first seen: escalates if seen again next tick
    dismissed: list[Candidate]
    # Every (subject, kind) that was a candidate of medium or more: the next tick's
    # `previous`.
    seen: set[tuple[str, str]]


def severity_of(z: float) -> Severity:
    level = sum(1 for bound in SEVERITY_Z if z >= bound)
    return SEVERITIES[level]


def _enough(t: Thresholds, *counts: int) -> bool:
    return all(n >= t.min_samples for n in counts)


def latency_z(s: DeploymentStats, t: Thresholds) -> float | None:
    """None when either period has fewer successful requests than the minimum sample."""
    w, b = s.window.latency, s.baseline.latency
    if not _enough(t, w.n, b.n):
        return None
    floor = max(t.latency_std_floor_ms, t.latency_std_floor_ratio * b.mean)
    return (w.mean - b.mean) / max(b.std, floor)


def error_z(s: DeploymentStats, t: Thresholds) -> float | None:
    w, b = s.window, s.baseline
    if not _enough(t, w.requests):
        return None
    base_rate = b.error_rate if _enough(t, b.requests) else 0.0
    p = max(base_rate, t.error_rate_floor)
    std = max(math.sqrt(p * (1.0 - p) / w.requests), t.error_std_floor)
    return (w.error_rate - base_rate) / std


def quality_z(s: DeploymentStats, t: Thresholds) -> float | None:
    w, b = s.window.quality, s.baseline.quality
    if not _enough(t, w.n, b.n):
        return None
    return (b.mean - w.mean) / max(b.std, t.quality_std_floor)


def health_score(error_rate: float, latency: float | None) -> float:
    error_penalty = min(60.0, 200.0 * error_rate)
    latency_penalty = min(40.0, 5.0 * max(0.0, latency or 0.0))
    return round(max(0.0, 100.0 - error_penalty - latency_penalty), 1)


def health_of(s: DeploymentStats, t: Thresholds) -> float | None:
    """None when the window has no requests: no evidence either way."""
    if s.window.requests == 0:
        return None
    return health_score(s.window.error_rate, latency_z(s, t))


def _candidate(
    s: DeploymentStats,
    kind: Kind,
    z: float,
    value: float,
    baseline: float,
    health: float | None,
    message: str,
    severity: Severity | None = None,
    **details: Any,
) -> Candidate:
    z = round(z, 2)
    return Candidate(
        route=s.route,
        deployment=s.deployment,
        kind=kind,
        severity=severity or severity_of(z),
        z=z,
        value=value,
        baseline=baseline,
        health=health,
        message=f"{s.subject}: {message} (z={z:.2f})",
        details={"window_requests": s.window.requests, **details},
    )


def _latency(s: DeploymentStats, t: Thresholds, health: float | None) -> Candidate | None:
    z = latency_z(s, t)
    if z is None or z < t.candidate_z:
        return None
    w, b = s.window.latency, s.baseline.latency
    return _candidate(
        s,
        "latency_spike",
        z,
        round(w.mean, 1),
        round(b.mean, 1),
        health,
        f"mean latency {w.mean:.0f} ms over {w.n} requests against a baseline of "
        f"{b.mean:.0f} +/- {b.std:.0f} ms",
        window_samples=w.n,
        baseline_samples=b.n,
        baseline_std_ms=round(b.std, 2),
    )


def _errors(s: DeploymentStats, t: Thresholds, health: float | None) -> Candidate | None:
    z = error_z(s, t)
    if z is None or z < t.candidate_z:
        return None
    w, b = s.window, s.baseline
    return _candidate(
        s,
        "error_burst",
        z,
        round(w.error_rate, 4),
        round(b.error_rate, 4),
        health,
        f"{w.errors} errors in {w.requests} requests ({w.error_rate:.0%}) against a "
        f"baseline of {b.error_rate:.1%} over {b.requests}",
        window_errors=w.errors,
        baseline_requests=b.requests,
        baseline_errors=b.errors,
    )


def _quality(s: DeploymentStats, t: Thresholds, health: float | None) -> Candidate | None:
    z = quality_z(s, t)
    if z is None or z < t.candidate_z:
        return None
    w, b = s.window.quality, s.baseline.quality
    return _candidate(
        s,
        "quality_drop",
        z,
        round(w.mean, 3),
        round(b.mean, 3),
        health,
        f"mean feedback score {w.mean:.2f} over {w.n} scores against a baseline of "
        f"{b.mean:.2f} +/- {b.std:.2f}",
        window_feedback=w.n,
        baseline_feedback=b.n,
    )


def _stagnation(
    s: DeploymentStats, route_window: int, route_baseline: int, t: Thresholds
) -> Candidate | None:
    if s.window.requests or not _enough(t, s.baseline.requests, route_window):
        return None
    share = s.baseline.requests / route_baseline
    expected = share * route_window
    z = math.sqrt(expected)
    if share < t.stagnation_min_share or z < t.candidate_z:
        return None
    # Never critical: a priority route's backup going quiet once its primary is back is
    # this pattern too, and worth a look rather than a page.
    capped = min(z, SEVERITY_Z[2] - 0.01)
    return _candidate(
        s,
        "stagnation",
        z,
        0.0,
        round(expected, 1),
        None,
        f"no requests in the window while its route served {route_window}; "
        f"{share:.0%} of them ({expected:.0f}) were due by its baseline share",
        severity_of(capped),
        route_window_requests=route_window,
        baseline_share=round(share, 3),
    )


def detect(stats: Sequence[DeploymentStats], t: Thresholds) -> list[Candidate]:
    """Every candidate the sensitive detector sees, strongest first."""
    route_window: defaultdict[str, int] = defaultdict(int)
    route_baseline: defaultdict[str, int] = defaultdict(int)
    for s in stats:
        route_window[s.route] += s.window.requests
        route_baseline[s.route] += s.baseline.requests
    found: list[Candidate] = []
    for s in stats:
        health = health_of(s, t)
        checks = (
            _latency(s, t, health),
            _errors(s, t, health),
            _quality(s, t, health),
            _stagnation(s, route_window[s.route], route_baseline[s.route], t),
        )
        found.extend(c for c in checks if c is not None)
    return sorted(found, key=lambda c: (-c.z, c.subject, c.kind))


def triage(candidates: Iterable[Candidate], previous: set[tuple[str, str]]) -> Triage:
    """Dismiss low, escalate high and critical, and escalate medium only when the same
    (subject, kind) was a candidate (medium or more) at the previous evaluation."""
    escalated: list[Candidate] = []
    held: list[Candidate] = []
    dismissed: list[Candidate] = []
    seen: set[tuple[str, str]] = set()
    for c in candidates:
        if c.severity == "low":
            dismissed.append(c)
            continue
        seen.add(c.key)
        if c.severity in ("high", "critical") or c.key in previous:
            escalated.append(c)
        else:
            held.append(c)
    return Triage(escalated, held, dismissed, seen)
