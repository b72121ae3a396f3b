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

# (metric, kind, help, field of `consolidation_status`)
_FAMILIES = (
    (
        "flywheel_records_queue_length",
        GaugeMetricFamily,
        "Request stream entries not yet in the database (each one 50 ms of records)",
        "queue_length",
    ),
    (
        "flywheel_records_pending",
        GaugeMetricFamily,
        "Stream entries read by a worker and not yet committed",
        "pending",
    ),
    (
        "flywheel_records_lag_seconds",
        GaugeMetricFamily,
        "Age of the oldest request record not yet in the database",
        "lag_s",
    ),
    (
        "flywheel_records_consolidated",
        CounterMetricFamily,
        "Request records written to the database by the workers",
        "processed",
    ),
    (
        "flywheel_records_trimmed",
        CounterMetricFamily,
        "Stream entries trimmed (lost) before a worker wrote them",
        "trimmed",
    ),
    (
        "flywheel_records_dead_letters",
        GaugeMetricFamily,
        "Records the database refused as data, set aside for an operator",
        "dead_letters",
    ),
)


class _Consolidation(Collector):
    def __init__(self, status: dict[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        for name, family, doc, field in _FAMILIES:
            yield family(name, doc, value=self._status[field])


def consolidation_exposition(status: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Consolidation(status))
    return generate_latest(registry)
