"""LangSmith export for /metrics: what was sent, dropped or failed, and what waits."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.observability.langsmith_runs import LangSmithRuns


class LangSmithCollector(Collector):
    def __init__(self, runs: LangSmithRuns) -> None:
        self._runs = runs

    def collect(self) -> Iterator[Metric]:
        r = self._runs
        family = CounterMetricFamily(
            "flywheel_langsmith_items",
            "Runs and feedback given to LangSmith, by outcome",
            labels=["outcome"],
        )
        for outcome, n in (("sent", r.sent), ("failed", r.failures), ("dropped", r.dropped)):
            family.add_metric([outcome], n)
        yield family
        yield GaugeMetricFamily(
            "flywheel_langsmith_pending", "Runs and feedback waiting to be sent", value=r.pending
        )
