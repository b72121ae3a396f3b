"""Prometheus metrics: GET /metrics.

Everything is kept as plain numbers in the process and read at scrape time by collectors,
so keeping it costs nothing per request: routing state (breakers, concurrency limits,
hedges), the cache's counters, and the requests answered (`flywheel_requests_total` by
route, status class and cache tier: one dict increment as the request is recorded). The
registry belongs to the app, not the module, so several apps (tests) do not collide.

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
  goes backwards;
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from app.cache.service import ResponseCache
from app.routing.dispatch import Dispatcher
from app.store.records import Recorder, RequestRecord

log = logging.getLogger("flywheel.metrics")

CIRCUIT_STATES = ("closed", "half_open", "open")
MIRROR_INTERVAL_S = 1.0
UNKNOWN_ROUTE = "other"  # a `model` no route answers to: clients choose it, so not a label
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


class RequestCounter:
    """Requests answered, by route, status class and cache tier.

    The request path only bumps a dict entry keyed by the raw (route, status, tier): about
    0.2 µs a request, the recorder's override included (timeit). Labels are made at read
    time. A route is kept only if the routes file has it (else None, shown as "other"), so
    clients inventing `model` names grow nothing.
    """

    __slots__ = ("_counts", "_routes")

    def __init__(self, routes: Iterable[str]) -> None:
        self._routes = frozenset(routes)
        self._counts: dict[tuple[str | None, int, str], int] = {}

    def count(self, route: str | None, status: int, cache: str) -> None:
        key = (route if route in self._routes else None, status, cache)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    @property
    def counts(self) -> dict[tuple[str, str, str], int]:
        """By (route, status class, cache tier), as labelled in `flywheel_requests_total`."""
        out: dict[tuple[str, str, str], int] = {}
        for (route, status, cache), n in list(self._counts.items()):
            key = (route or UNKNOWN_ROUTE, f"{status // 100}xx", cache)
            out[key] = out.get(key, 0) + n
        return out

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def by(self, position: int) -> dict[str, int]:
        """Totals by one label: 0 route, 1 status class, 2 cache tier."""
        out: dict[str, int] = {}
        for key, n in self.counts.items():
            out[key[position]] = out.get(key[position], 0) + n
        return out


class CountedRecorder(Recorder):
    """The request recorder, counting every record for `flywheel_requests_total` first."""

    def __init__(self, *args: Any, counter: RequestCounter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = counter

    def record(self, rec: RequestRecord) -> None:
        self.counter.count(rec.route, rec.status, rec.cache)
        super().record(rec)


class GatewayCollector(Collector):
    def __init__(self, requests: RequestCounter) -> None:
        self._requests = requests

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "flywheel_requests",
            "Requests answered, by route, status class and cache tier",
            labels=["route", "status", "cache"],
        )
        for key, n in self._requests.counts.items():
            family.add_metric(list(key), n)
        yield family
        yield GaugeMetricFamily("flywheel_gateway_processes", "Gateway processes", value=1)


class Mirror:
    """Copies collectors' values into this process's multiprocess files (changes only)."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = collectors
        self._metrics: dict[str, Counter | Gauge] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def sync(self) -> None:
        for collector in self._collectors:
            for family in collector.collect():
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
) -> GatewayMetrics:
    collectors = [
        RoutingCollector(dispatcher),
        CacheCollector(cache),
        GatewayCollector(requests),
        *extra,
    ]
    return GatewayMetrics(collectors, multiproc_dir, requests)
