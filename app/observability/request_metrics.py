"""Per-request metrics: counts, latency and time-to-first-token histograms, tokens, cost
and retries, all from the request records (`RequestCounter.observe`, called for every
record by the recorder).

The request path only updates plain numbers: one dict lookup keyed by the raw
(route, deployment, status, cache tier), a `bisect` over a short tuple of bucket bounds
per histogram and a few additions (about 1 µs a record, timeit). Labels, status classes,
cumulative buckets and seconds are made at scrape time.

Label sets are bounded by the routes file, never by what clients send: a route the file
does not have is `other` (clients choose `model`), a deployment it does not name is
`other`, and a request no deployment answered (cache hits, ensembles, requests refused
before routing) is `deployment="none"`. Status is the class (2xx, 4xx, 5xx) and the cache
tier one of four, so `flywheel_request_duration_seconds` has at most
(routes + 1) x (deployments + 2) x 4 x 4 label sets, and in practice far fewer (4xx answers
mostly have no deployment, cache hits never have one). The status class is kept on the
duration because a fast refusal and a slow success are different latencies: an SLO on
the successes' p99 needs them apart.

Tokens and cost are what the upstreams processed and billed: cache hits (which replay a
stored answer's usage at no cost) are left out of `flywheel_tokens_total`. Retries are the
extra upstream attempts of a request (retries, fallbacks and hedges): `attempts - 1`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from app.routing.config import RouteConfig
from app.store.records import RequestRecord

UNKNOWN = "other"  # a route or deployment the routes file does not have
NO_DEPLOYMENT = "none"  # answered without a deployment: cache hit, ensemble, refusal
CACHE_HITS = frozenset({"hit-l1", "hit-l2"})

# Bucket upper bounds in milliseconds, the unit of the records (so the request path does
# no conversion); exposed in seconds. Whole gateway requests: from a cache hit (a few ms)
# to a long generation (two minutes), finest where LLM answers cluster (0.25-10 s).
DURATION_BUCKETS_MS: tuple[int, ...] = (
    *(5, 10, 25, 50, 100, 250, 500, 750),
    *(1000, 1500, 2500, 5000, 7500, 10_000, 15_000, 30_000, 60_000, 120_000),
)
# Time to the first token of a stream: most land between 0.1 and 3 s.
TTFT_BUCKETS_MS: tuple[int, ...] = (
    *(5, 10, 25, 50, 100, 200, 300, 500, 750),
    *(1000, 1500, 2000, 3000, 5000, 10_000, 30_000, 60_000, 120_000),
)


def _le(bounds_ms: Sequence[int]) -> tuple[str, ...]:
    """The buckets' `le` labels, in seconds, +Inf last."""
    return (*(repr(b / 1000) for b in bounds_ms), "+Inf")


DURATION_LE = _le(DURATION_BUCKETS_MS)
TTFT_LE = _le(TTFT_BUCKETS_MS)
Key = tuple[str | None, str | None, int, str]  # raw (route, deployment, status, cache)
Pair = tuple[str, str]  # labelled (route, deployment)


class _Series:
    """Everything counted for one raw key: histogram buckets (not cumulative; the last
    one is +Inf) and their sums in ms, tokens, cost and retries."""

    __slots__ = (
        "completion",
        "cost",
        "duration",
        "duration_ms",
        "prompt",
        "retries",
        "ttft",
        "ttft_ms",
    )

    def __init__(self) -> None:
        self.duration = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.duration_ms = 0.0
        self.ttft = [0] * (len(TTFT_BUCKETS_MS) + 1)
        self.ttft_ms = 0.0
        self.prompt = 0
        self.completion = 0
        self.cost = 0.0
        self.retries = 0


class _Histogram:
    """One labelled histogram while a scrape merges raw series into it."""

    __slots__ = ("counts", "total_ms")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total_ms = 0.0

    def add(self, counts: Sequence[int], total_ms: float) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total_ms += total_ms

    def buckets(self, le: Sequence[str]) -> list[tuple[str, float]]:
        """Cumulative, ending with +Inf, as the exposition wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(le, self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Labelled:
    """A scrape's view: the raw series merged by their labels."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.duration: dict[tuple[str, str, str, str], _Histogram] = {}
        self.ttft: dict[Pair, _Histogram] = {}
        self.usage: dict[Pair, list[float]] = {}  # prompt, completion, cost, retries

    def add(self, key: Key, s: _Series) -> None:
        route, deployment, status, cache = key
        r, d, klass = route or UNKNOWN, deployment or NO_DEPLOYMENT, f"{status // 100}xx"
        n = sum(s.duration)
        self.requests[(r, klass, cache)] = self.requests.get((r, klass, cache), 0) + n
        hist = self.duration.setdefault((r, d, klass, cache), _Histogram(len(s.duration)))
        hist.add(s.duration, s.duration_ms)
        if any(s.ttft):
            self.ttft.setdefault((r, d), _Histogram(len(s.ttft))).add(s.ttft, s.ttft_ms)
        usage = self.usage.setdefault((r, d), [0, 0, 0.0, 0])
        if cache not in CACHE_HITS:
            usage[0] += s.prompt
            usage[1] += s.completion
        usage[2] += s.cost
        usage[3] += s.retries


class RequestCounter:
    """Requests answered, with their latency, time to first token, tokens, cost, retries."""

    __slots__ = ("_deployments", "_routes", "_series")

    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self._routes = frozenset(routes)
        self._deployments = frozenset(d.name for r in routes.values() for d in r.deployments)
        self._series: dict[Key, _Series] = {}

    def observe(self, rec: RequestRecord) -> None:
        """Count one record. The hot path: keep it to plain lookups and additions."""
        route = rec.route if rec.route in self._routes else None
        deployment = rec.deployment
        if deployment is not None and deployment not in self._deployments:
            deployment = UNKNOWN
        key = (route, deployment, rec.status, rec.cache)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series()
        ms = rec.latency_ms
        s.duration[bisect_left(DURATION_BUCKETS_MS, ms)] += 1  # le: a bound counts in
        s.duration_ms += ms
        ttft = rec.ttft_ms
        if ttft is not None:  # streams only
            s.ttft[bisect_left(TTFT_BUCKETS_MS, ttft)] += 1
            s.ttft_ms += ttft
        s.prompt += rec.prompt_tokens
        s.completion += rec.completion_tokens
        s.cost += rec.cost
        if rec.attempts > 1:
            s.retries += rec.attempts - 1

    def labelled(self) -> Labelled:
        view = Labelled()
        # A copy: a scrape may run while the loop records (multiprocess exposition).
        for key, series in list(self._series.items()):
            view.add(key, series)
        return view

    @property
    def counts(self) -> dict[tuple[str, str, str], int]:
        """By (route, status class, cache tier), as labelled in `flywheel_requests_total`."""
        return self.labelled().requests

    @property
    def total(self) -> int:
        return sum(sum(s.duration) for s in list(self._series.values()))

    def by(self, position: int) -> dict[str, int]:
        """Totals by one label: 0 route, 1 status class, 2 cache tier."""
        out: dict[str, int] = {}
        for key, n in self.counts.items():
            out[key[position]] = out.get(key[position], 0) + n
        return out

    def families(self) -> Iterator[Metric]:
        view = self.labelled()
        requests = CounterMetricFamily(
            "flywheel_requests",
            "Requests answered, by route, status class and cache tier",
            labels=["route", "status", "cache"],
        )
        for key, n in view.requests.items():
            requests.add_metric(list(key), n)
        yield requests
        duration = HistogramMetricFamily(
            "flywheel_request_duration_seconds",
            "Time to answer a request (a stream's whole body), by route, deployment, "
            "status class and cache tier",
            labels=["route", "deployment", "status", "cache"],
        )
        for labels, hist in view.duration.items():
            buckets = hist.buckets(DURATION_LE)
            duration.add_metric(list(labels), buckets, hist.total_ms / 1000)
        yield duration
        ttft = HistogramMetricFamily(
            "flywheel_time_to_first_token_seconds",
            "Time from the request to the first token of a stream",
            labels=["route", "deployment"],
        )
        for pair, hist in view.ttft.items():
            ttft.add_metric(list(pair), hist.buckets(TTFT_LE), hist.total_ms / 1000)
        yield ttft
        yield from _usage_families(view.usage)


def _usage_families(usage: dict[Pair, list[float]]) -> Iterator[Metric]:
    pair = ["route", "deployment"]
    tokens = CounterMetricFamily(
        "flywheel_tokens",
        "Tokens the upstream deployments processed (cache hits excluded)",
        labels=[*pair, "kind"],
    )
    cost = CounterMetricFamily(
        "flywheel_cost_usd",
        "Upstream cost in US dollars, from the routes file's prices",
        labels=pair,
    )
    retries = CounterMetricFamily(
        "flywheel_retries",
        "Upstream attempts beyond a request's first (retries, fallbacks, hedges)",
        labels=pair,
    )
    for (route, deployment), (prompt, completion, dollars, extra) in usage.items():
        tokens.add_metric([route, deployment, "prompt"], prompt)
        tokens.add_metric([route, deployment, "completion"], completion)
        cost.add_metric([route, deployment], dollars)
        retries.add_metric([route, deployment], extra)
    yield from (tokens, cost, retries)
