"""The request stream's consolidation, for GET /metrics.

The queue is shared by every gateway and worker, so it is read from Redis at scrape
time by whichever process answers and exposed once (never summed over processes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _Consolidation(Collector):
    def __init__(self, status: dict[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status
        yield GaugeMetricFamily(
            "flywheel_records_queue_length",
            "Request stream entries not yet in the database (each one 50 ms of records)",
            value=s["queue_length"],
        )
        yield GaugeMetricFamily(
            "flywheel_records_pending",
            "Stream entries read by a worker and not yet committed",
            value=s["pending"],
        )
        yield GaugeMetricFamily(
            "flywheel_records_lag_seconds",
            "Age of the oldest request record not yet in the database",
            value=s["lag_s"],
        )
        yield CounterMetricFamily(
            "flywheel_records_consolidated",
            "Request records written to the database by the workers",
            value=s["processed"],
        )
        yield GaugeMetricFamily(
            "flywheel_records_dead_letters",
            "Records the database refused as data, set aside for an operator",
            value=s["dead_letters"],
        )


def consolidation_exposition(status: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Consolidation(status))
    return generate_latest(registry)
