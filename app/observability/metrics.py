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


def make_registry(dispatcher: Dispatcher) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoutingCollector(dispatcher))
    return registry
