"""Limiter decisions for /metrics: the per-key limiter and the HTTP-level limits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.ratelimit.limiter import Limiter


def _by_label(name: str, doc: str, label: str, counts: Counter[str]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


class Refusals(Protocol):
    refused: int


class LimitsCollector(Collector):
    def __init__(self, limiter: Limiter, http: Refusals) -> None:
        self._limiter = limiter
        self._http = http

    def collect(self) -> Iterator[Metric]:
        lim = self._limiter
        yield _by_label(
            "flywheel_limiter_decisions",
            "Per-key admissions: allowed, or the limit that refused",
            "result",
            lim.decisions,
        )
        yield _by_label(
            "flywheel_limiter_degraded",
            "Per-key decisions taken without Redis, by the route's mode",
            "mode",
            lim.degraded,
        )
        yield CounterMetricFamily(
            "flywheel_limiter_settle_failures",
            "Reservations left as estimated because Redis could not be reached",
            value=lim.settle_failures,
        )
        yield GaugeMetricFamily(
            "flywheel_limiter_redis_up", "1 when the per-key limits reach Redis", value=lim.redis_up
        )
        yield CounterMetricFamily(
            "flywheel_http_limited",
            "Requests refused by the per-process HTTP limits",
            value=self._http.refused,
        )
