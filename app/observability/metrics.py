"""Prometheus metrics: GET /metrics.

Everything is kept as plain numbers in the process and read at scrape time by collectors,
so keeping it costs next to nothing per request: routing state (breakers, concurrency
limits, hedges), the cache's counters, the limiter's decisions, and the requests answered
with their latency, time to first token, tokens, cost and retries (request_metrics.py:
a few additions as each request is recorded). The registry belongs to the app, not the
module, so several apps (tests) do not collide.

Several worker processes (`uvicorn --workers N`): each has its own router, cache and
counters, and a scrape reaches one of them at random, so per-process numbers would jump
about. With PROMETHEUS_MULTIPROC_DIR set (a directory shared by the processes of one
gateway, emptied before it starts; prometheus_client reads the variable when first
imported) the exposition uses prometheus_client's multiprocess mode:

- each process mirrors its collectors into its own files in that directory, at every
  scrape it answers and every `MIRROR_INTERVAL_S` in the background, so a scrape sees the
  other processes' state at most that old; a scrape merges every process's files (file
  reads, in a thread, off the event loop);
- counters are mirrored as increments and summed over every process that has run since
  the directory was emptied: a process that exits keeps its counts, so no counter ever
  goes backwards; histograms likewise, bucket by bucket and their sums;
- gauges use prometheus_client's "live" modes, so a process that exits stops counting
  (it deletes its gauge files at shutdown; a starting process deletes those of processes
  no longer alive, e.g. killed). In-flight requests, concurrency limits and L1 entries and
  bytes are summed over the processes; `flywheel_circuit_state{state}` counts the
  processes whose breaker is in that state; `flywheel_cache_l2_up` is the minimum (0 when
  any process finds L2 down); `flywheel_gateway_processes` counts the live processes.

Without the variable one process is assumed and the collectors are read directly; a
worker process started without it logs a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from app.cache.service import ResponseCache
from app.observability.request_metrics import RequestCounter
from app.routing.dispatch import Dispatcher
from app.store.records import Recorder, RequestRecord

__all__ = [
    "CountedRecorder",
    "GatewayMetrics",
    "RequestCounter",
    "make_metrics",
    "multiprocess_dir",
]

log = logging.getLogger("flywheel.metrics")

CIRCUIT_STATES = ("closed", "half_open", "open")
MIRROR_INTERVAL_S = 1.0
Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
# Multiprocess aggregation of the gauges; the rest are summed ("livesum").
GAUGE_MODES = {"flywheel_cache_l2_up": "livemin", "flywheel_limiter_redis_up": "livemin"}


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


class CountedRecorder(Recorder):
    """The request recorder, counting every record for the request metrics first."""

    def __init__(self, *args: Any, counter: RequestCounter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = counter

    def record(self, rec: RequestRecord) -> None:
        self.counter.observe(rec)
        super().record(rec)


class GatewayCollector(Collector):
    def __init__(
        self, requests: RequestCounter, in_flight: Callable[[], int] | None = None
    ) -> None:
        self._requests = requests
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        yield from self._requests.families()
        yield GaugeMetricFamily("flywheel_gateway_processes", "Gateway processes", value=1)
        if self._in_flight is not None:
            yield GaugeMetricFamily(
                "flywheel_requests_in_flight",
                "Chat and embeddings requests being served (streams until their end)",
                value=self._in_flight(),
            )


class Mirror:
    """Copies collectors' values into this process's multiprocess files (changes only)."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = collectors
        self._metrics: dict[str, Counter | Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}
        self._last_histograms: dict[tuple[str, Labels], tuple[list[float], float]] = {}

    def sync(self) -> None:
        for collector in self._collectors:
            for family in collector.collect():
                if family.type == "histogram":
                    self._write_histograms(family)
                    continue
                for sample in family.samples:
                    self._write(family, sample)

    def _write(self, family: Metric, sample: Sample) -> None:
        names = tuple(sorted(sample.labels))
        labels = tuple(sample.labels[n] for n in names)
        key = (sample.name, labels)
        last = self._last.get(key)
        if last == sample.value:
            return
        metric = self._metric(family, names)
        child = metric.labels(*labels) if names else metric
        if isinstance(child, Counter):
            # In-process counters only grow; the files get the growth since last time.
            if sample.value > (last or 0.0):
                child.inc(sample.value - (last or 0.0))
        else:
            child.set(sample.value)
        self._last[key] = sample.value

    def _write_histograms(self, family: Metric) -> None:
        """Each labelled histogram's growth since last time, bucket by bucket.

        The files hold a histogram as per-bucket counts (not cumulative) and a sum, which
        MultiProcessCollector adds up over the processes; so the cumulative buckets the
        collector shows are turned back into per-bucket counts and mirrored, like the
        counters, as increments."""
        cumulative: dict[Labels, list[tuple[float, float]]] = {}
        sums: dict[Labels, float] = {}
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                cumulative.setdefault(labels, []).append((le, sample.value))
            elif sample.name.endswith("_sum"):
                sums[labels] = sample.value
        for labels, buckets in cumulative.items():
            buckets.sort()
            running = [c for _, c in buckets]
            counts = [c - before for c, before in zip(running, [0.0, *running[:-1]], strict=True)]
            bounds = tuple(le for le, _ in buckets)
            self._grow_histogram(family, labels, bounds, counts, sums.get(labels, 0.0))

    def _grow_histogram(
        self,
        family: Metric,
        labels: Labels,
        bounds: tuple[float, ...],
        counts: list[float],
        total: float,
    ) -> None:
        key = (family.name, labels)
        last_counts, last_total = self._last_histograms.get(key, ([0.0] * len(counts), 0.0))
        if last_counts == counts and last_total == total:
            return
        metric = self._histograms.get(family.name)
        if metric is None:
            names = [name for name, _ in labels]
            metric = Histogram(
                family.name, family.documentation, names, registry=None, buckets=bounds
            )
            self._histograms[family.name] = metric
        child = metric.labels(*(value for _, value in labels)) if labels else metric
        cells, sum_cell = _histogram_cells(child)
        for cell, now, before in zip(cells, counts, last_counts, strict=True):
            if now > before:
                cell.inc(now - before)
        if total > last_total:
            sum_cell.inc(total - last_total)
        self._last_histograms[key] = (counts, total)

    def _metric(self, family: Metric, names: tuple[str, ...]) -> Counter | Gauge:
        metric = self._metrics.get(family.name)
        if metric is None:
            if family.type == "counter":
                metric = Counter(family.name, family.documentation, names, registry=None)
            else:
                mode = GAUGE_MODES.get(family.name, "livesum")
                metric = Gauge(
                    family.name,
                    family.documentation,
                    names,
                    registry=None,
                    multiprocess_mode=mode,  # type: ignore[arg-type]
                )
            self._metrics[family.name] = metric
        return metric


class _Cell(Protocol):
    def inc(self, amount: float) -> None: ...


def _histogram_cells(child: Histogram) -> tuple[Sequence[_Cell], _Cell]:
    """The values a Histogram child keeps for its buckets (+Inf last) and its sum.

    prometheus_client adds to a histogram only through `observe`, one value at a time, but
    the mirror has counts per bucket and a sum to add: it adds them to the child's values
    directly. In multiprocess mode each is a cell of this process's histogram file, per
    bucket, not cumulative (what `observe` does too). Private attributes, kept to here.
    """
    return child._buckets, child._sum


def _forget_dead_processes(path: str) -> None:
    """Delete the gauge files of processes that died without cleaning up (e.g. killed)."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid_text = os.path.basename(name).rsplit("_", 1)[-1].removesuffix(".db")
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            mark_process_dead(int(pid_text), path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, under another user


class GatewayMetrics(CollectorRegistry):
    """The app's registry; in multiprocess mode it exposes the merge of every process."""

    def __init__(
        self,
        collectors: Sequence[Collector],
        multiproc_dir: str | None,
        requests: RequestCounter | None = None,
    ) -> None:
        super().__init__(auto_describe=False)
        self.multiproc_dir = multiproc_dir
        self.requests = requests
        self._mirror: Mirror | None = None
        if multiproc_dir is None:
            for collector in collectors:
                self.register(collector)
            return
        os.makedirs(multiproc_dir, exist_ok=True)
        _forget_dead_processes(multiproc_dir)
        self._mirror = Mirror(collectors)
        self._mirror.sync()
        MultiProcessCollector(self, path=multiproc_dir)  # type: ignore[no-untyped-call]

    async def exposition(self) -> bytes:
        if self._mirror is None:
            return generate_latest(self)
        self._mirror.sync()
        return await asyncio.to_thread(generate_latest, self)

    async def run_background(self) -> None:
        """Keep this process's files fresh for scrapes another process answers."""
        if self._mirror is None:
            return
        while True:
            await asyncio.sleep(MIRROR_INTERVAL_S)
            self._mirror.sync()

    def close(self) -> None:
        if self._mirror is None or self.multiproc_dir is None:
            return
        self._mirror.sync()  # counters keep this process's final counts
        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid(), self.multiproc_dir)  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when prometheus_client is in multiprocess mode."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client chose its value class at import, before the variable was set.
        log.warning("PROMETHEUS_MULTIPROC_DIR set after prometheus_client was imported: ignored")
        return None
    if not path and multiprocessing.parent_process() is not None:
        # uvicorn --workers (or --reload) runs the app in child processes.
        log.warning(
            "gateway in a child process without PROMETHEUS_MULTIPROC_DIR: with several "
            "workers, /metrics shows only the process that answers each scrape"
        )
    return path or None


def make_metrics(
    dispatcher: Dispatcher,
    cache: ResponseCache,
    requests: RequestCounter,
    multiproc_dir: str | None = None,
    extra: Sequence[Collector] = (),
    in_flight: Callable[[], int] | None = None,
) -> GatewayMetrics:
    collectors = [
        RoutingCollector(dispatcher),
        CacheCollector(cache),
        GatewayCollector(requests, in_flight),
        *extra,
    ]
    return GatewayMetrics(collectors, multiproc_dir, requests)
