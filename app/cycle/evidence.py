"""What the cycle knows about one arm (a route's deployment, or a prompt variant):
time buckets of aggregated requests, summarised with exponential decay.

Buckets rather than rows: the worker aggregates them in SQL (a row per arm and bucket,
whatever the traffic), and the simulation harness builds them from simulated requests,
so both drive the same summaries. A bucket's weight halves every `half_life_s` of age,
so drift shows in the figures while a quiet arm keeps what it learned.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Upper bounds (ms) of the latency histogram's bins; one more bin past the last.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    25,
    50,
    100,
    150,
    200,
    300,
    400,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    7500,
    10000,
    15000,
    20000,
    30000,
    60000,
)
BINS = len(LATENCY_BOUNDS_MS) + 1


def latency_bin(latency_ms: float) -> int:
    return bisect_left(LATENCY_BOUNDS_MS, latency_ms)


@dataclass(slots=True)
class Bucket:
    """Requests of one arm that started in [start, start + span)."""

    start: float  # epoch seconds
    requests: int = 0
    errors: int = 0
    scored: int = 0  # requests with a quality score
    q_sum: float = 0.0
    q_sq: float = 0.0
    cost_sum: float = 0.0
    latency_hist: list[int] = field(default_factory=lambda: [0] * BINS)

    def add(self, *, quality: float | None, cost: float, latency_ms: float, error: bool) -> None:
        self.requests += 1
        self.errors += int(error)
        self.cost_sum += cost
        self.latency_hist[latency_bin(latency_ms)] += 1
        if quality is not None:
            self.scored += 1
            self.q_sum += quality
            self.q_sq += quality * quality


@dataclass(frozen=True, slots=True)
class Summary:
    """Decayed figures of one arm. `n` and `n_scored` are effective (decayed) counts;
    `count` is the raw number of requests in the window."""

    count: int
    n: float
    n_scored: float
    quality: float | None  # mean effective quality
    variance: float  # of one request's quality
    trend_per_h: float  # slope of a weighted linear fit of bucket means, per hour
    error_rate: float
    p95_latency_ms: float | None
    cost_per_request: float

    @property
    def stderr(self) -> float:
        """Standard error of `quality` (inf with fewer than two effective scores)."""
        if self.n_scored < 2:
            return math.inf
        return math.sqrt(max(self.variance, 1e-6) / self.n_scored)


EMPTY = Summary(0, 0.0, 0.0, None, 0.0, 0.0, 0.0, None, 0.0)


def decay(age_s: float, half_life_s: float) -> float:
    return float(0.5 ** (max(0.0, age_s) / half_life_s))


def quantile(hist: Sequence[float], q: float) -> float | None:
    """The q-quantile of a (weighted) latency histogram, interpolated inside its bin."""
    total = sum(hist)
    if total <= 0:
        return None
    goal = q * total
    seen = 0.0
    for i, count in enumerate(hist):
        if count <= 0:
            continue
        if seen + count >= goal:
            low = LATENCY_BOUNDS_MS[i - 1] if i > 0 else 0.0
            high = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else low * 2
            return low + (high - low) * (goal - seen) / count
        seen += count
    return LATENCY_BOUNDS_MS[-1] * 2


def summarize(buckets: Iterable[Bucket], now: float, half_life_s: float) -> Summary:
    """The decayed summary of an arm's buckets as of `now`."""
    count = 0
    n = n_scored = q_sum = q_sq = errors = cost = 0.0
    hist = [0.0] * BINS
    points: list[tuple[float, float, float]] = []  # (hours from now, bucket mean, weight)
    for b in buckets:
        if b.requests == 0:
            continue
        w = decay(now - b.start, half_life_s)
        count += b.requests
        n += w * b.requests
        errors += w * b.errors
        cost += w * b.cost_sum
        for i, c in enumerate(b.latency_hist):
            if c:
                hist[i] += w * c
        if b.scored:
            n_scored += w * b.scored
            q_sum += w * b.q_sum
            q_sq += w * b.q_sq
            points.append(((b.start - now) / 3600.0, b.q_sum / b.scored, w * b.scored))
    if count == 0:
        return EMPTY
    mean = q_sum / n_scored if n_scored > 0 else None
    variance = 0.0
    if mean is not None and n_scored > 1:
        variance = max(0.0, q_sq / n_scored - mean * mean) * n_scored / (n_scored - 1)
    return Summary(
        count=count,
        n=n,
        n_scored=n_scored,
        quality=mean,
        variance=variance,
        trend_per_h=_slope(points),
        error_rate=errors / n if n > 0 else 0.0,
        p95_latency_ms=quantile(hist, 0.95),
        cost_per_request=cost / n if n > 0 else 0.0,
    )


def _slope(points: Sequence[tuple[float, float, float]]) -> float:
    """Weighted least-squares slope of (x, y, w); 0 with fewer than three points."""
    if len(points) < 3:
        return 0.0
    sw = sum(w for _, _, w in points)
    mx = sum(x * w for x, _, w in points) / sw
    my = sum(y * w for _, y, w in points) / sw
    sxx = sum(w * (x - mx) ** 2 for x, _, w in points)
    if sxx <= 0:
        return 0.0
    return sum(w * (x - mx) * (y - my) for x, y, w in points) / sxx


def since(buckets: Iterable[Bucket], start: float) -> list[Bucket]:
    """The buckets that started at or after `start` (the evidence of a recent window)."""
    return [b for b in buckets if b.start >= start]


def merge(*parts: Iterable[Bucket]) -> list[Bucket]:
    """Buckets of several arms added up per start (e.g. a route's deployments), oldest
    first."""
    out: dict[float, Bucket] = {}
    for buckets in parts:
        for b in buckets:
            m = out.get(b.start)
            if m is None:
                m = out[b.start] = Bucket(b.start)
            m.requests += b.requests
            m.errors += b.errors
            m.scored += b.scored
            m.q_sum += b.q_sum
            m.q_sq += b.q_sq
            m.cost_sum += b.cost_sum
            m.latency_hist = [x + y for x, y in zip(m.latency_hist, b.latency_hist, strict=True)]
    return [out[start] for start in sorted(out)]
