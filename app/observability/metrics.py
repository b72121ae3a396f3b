"""Prometheus metrics: GET /metrics.

Routing state (breakers, concurrency limits, hedges, Retry-After waits) is read from the
router at scrape time by a collector, so keeping it costs nothing per request. The
registry belongs to the app, not the module, so several apps (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.cache.service import ResponseCache
from app.routing.dispatch import Dispatcher

CIRCUIT_STATES = ("closed", "half_open", "open")


class RoutingCollector(Collector):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        labels = ["route", "deployment"]
        circuit = GaugeMetricFamily(
            "flywheel_circuit_state", "1 for the breaker's current state", labels=[*labels, "state"]
        )
        opened = CounterMetricFamily(
            "flywheel_circuit_opened", "Times the breaker opened", labels=labels
        )
        limit = GaugeMetricFamily(
            "flywheel_concurrency_limit", "Adaptive concurrency limit", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "flywheel_upstream_in_flight", "Requests in flight to the deployment", labels=labels
        )
        rejected = CounterMetricFamily(
            "flywheel_concurrency_rejected", "Requests refused at the limit", labels=labels
        )
        for pool in self._dispatcher.router.deployments.values():
            for d in pool:
                key = [d.route, d.name]
                state = d.breaker.current()
                for name in CIRCUIT_STATES:
                    circuit.add_metric([*key, name], 1.0 if state == name else 0.0)
                opened.add_metric(key, d.breaker.opened_count)
                if d.limiter.limit != float("inf"):
                    limit.add_metric(key, d.limiter.limit)
                in_flight.add_metric(key, d.limiter.in_flight)
                rejected.add_metric(key, d.limiter.rejected)
        hedges = CounterMetricFamily("flywheel_hedges", "Hedged requests", labels=["outcome"])
        hedges.add_metric(["started"], self._dispatcher.hedges_started)
        hedges.add_metric(["won"], self._dispatcher.hedges_won)
        yield from (circuit, opened, limit, in_flight, rejected, hedges)


class CacheCollector(Collector):
    """The response cache's counters per tier (l1, l2), read at scrape time."""

    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        c, s = self._cache, self._cache.stats
        hits = CounterMetricFamily("flywheel_cache_hits", "Cache hits", labels=["tier"])
        misses = CounterMetricFamily("flywheel_cache_misses", "Cache misses", labels=["tier"])
        hit_time = CounterMetricFamily(
            "flywheel_cache_hit_seconds", "Time spent serving lookups that hit", labels=["tier"]
        )
        for name, tier in (("l1", s.l1), ("l2", s.l2)):
            hits.add_metric([name], tier.hits)
            misses.add_metric([name], tier.misses)
            hit_time.add_metric([name], tier.hit_seconds)
        yield from (hits, misses, hit_time)
        yield GaugeMetricFamily("flywheel_cache_entries", "L1 entries", value=len(c.l1))
        yield GaugeMetricFamily("flywheel_cache_bytes", "L1 bytes", value=c.l1.bytes)
        yield CounterMetricFamily("flywheel_cache_evictions", "L1 evictions", value=c.l1.evictions)
        yield CounterMetricFamily("flywheel_cache_stores", "Answers stored", value=s.stores)
        yield CounterMetricFamily(
            "flywheel_cache_coalesced",
            "Requests that waited for an identical one",
            value=s.coalesced,
        )
        if c.l2 is not None:
            yield GaugeMetricFamily("flywheel_cache_l2_up", "1 when L2 answers", value=c.l2.up)
            yield CounterMetricFamily(
                "flywheel_cache_l2_failures", "Failed L2 calls", value=c.l2.failures
            )


def make_registry(dispatcher: Dispatcher, cache: ResponseCache) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoutingCollector(dispatcher))
    registry.register(CacheCollector(cache))
    return registry
