"""Request metrics from records: bounded labels, exact buckets, and the multiprocess mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app.observability.metrics import GatewayCollector, Mirror
from app.observability.request_metrics import RequestCounter
from app.routing.config import RouteConfig
from app.store.records import RequestRecord

ROUTES = {
    name: RouteConfig.model_validate(
        {"deployments": [{"name": d, "provider": "mock", "model": "m"} for d in deployments]}
    )
    for name, deployments in {"chat": ["d1", "d2"], "demo": ["mock-a"]}.items()
}
DURATION = "flywheel_request_duration_seconds"
TTFT = "flywheel_time_to_first_token_seconds"


def rec(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": "r",
        "endpoint": "chat.completions",
        "route": "chat",
        "deployment": "d1",
        "provider": "mock",
        "model": "m",
        "status": 200,
        "stream": False,
        "started_at": 0.0,
        "latency_ms": 100.0,
        "cache": "miss",
    }
    return RequestRecord(**{**base, **fields})


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def exposed(text: str, *names: str) -> Samples:
    """Samples of the named families (every family when none), keyed by name and labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        if names and family.name not in names:
            continue
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(counter: RequestCounter, *names: str) -> Samples:
    """A single-process scrape: the collector read directly."""
    registry = CollectorRegistry()
    registry.register(GatewayCollector(counter))
    return exposed(generate_latest(registry).decode(), *names)


def sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


def bucket(route: str, deployment: str, status: str, cache: str, le: str) -> tuple[Any, ...]:
    labels = {"route": route, "deployment": deployment, "status": status, "cache": cache}
    return sample(DURATION + "_bucket", **labels, le=le)


def test_requests_counter_bounds_routes_and_deployments() -> None:
    counter = RequestCounter(ROUTES)
    counter.observe(rec())
    counter.observe(rec(status=201))
    counter.observe(rec(route="demo", deployment="mock-a", status=503, cache="bypass"))
    counter.observe(rec(route="made-up-model-123", deployment=None, status=404, cache="bypass"))
    counter.observe(rec(route=None, deployment=None, status=400, cache="bypass"))
    counter.observe(rec(deployment="renamed-since"))  # a name the routes file lacks
    assert counter.counts == {
        ("chat", "2xx", "miss"): 3,
        ("demo", "5xx", "bypass"): 1,
        ("other", "4xx", "bypass"): 2,
    }
    assert counter.total == 6
    assert counter.by(1) == {"2xx": 3, "5xx": 1, "4xx": 2}
    got = scrape(counter)
    deployments = {dict(labels)["deployment"] for name, labels in got if name.startswith(DURATION)}
    assert deployments == {"d1", "mock-a", "none", "other"}
    assert got[bucket("other", "none", "4xx", "bypass", "+Inf")] == 2
    assert got[bucket("chat", "d1", "2xx", "miss", "+Inf")] == 2  # 200 and 201: one class


def test_duration_buckets_are_exact_and_cumulative() -> None:
    counter = RequestCounter(ROUTES)
    for ms in (5.0, 5.01, 300.0, 300.0, 119_999.0, 200_000.0):
        counter.observe(rec(latency_ms=ms))
    got = scrape(counter)

    def at(le: str) -> float:
        return got[bucket("chat", "d1", "2xx", "miss", le)]

    # le is "at most": 5 ms is in the 0.005 bucket, 5.01 ms in the next.
    assert [at(le) for le in ("0.005", "0.01", "0.25", "0.5", "120.0", "+Inf")] == [
        1,
        2,
        2,
        4,
        5,
        6,
    ]
    labels = {"route": "chat", "deployment": "d1", "status": "2xx", "cache": "miss"}
    assert got[sample(DURATION + "_count", **labels)] == 6
    assert got[sample(DURATION + "_sum", **labels)] == pytest.approx(320.60901)


def test_ttft_only_for_streams_and_usage_per_deployment() -> None:
    counter = RequestCounter(ROUTES)
    usage = {"prompt_tokens": 100, "completion_tokens": 40, "cost": 0.25}
    counter.observe(rec(stream=True, ttft_ms=150.0, attempts=3, **usage))
    counter.observe(rec(stream=True, ttft_ms=2500.0, attempts=1, **usage))
    counter.observe(rec(attempts=2, **usage))
    counter.observe(rec(deployment="d2", attempts=0, status=502, prompt_tokens=7, cost=0.5))
    # A cache hit replays the stored answer's usage: no upstream processed those tokens.
    counter.observe(rec(deployment=None, cache="hit-l1", attempts=0, prompt_tokens=999))
    got = scrape(counter)
    pair = {"route": "chat", "deployment": "d1"}
    assert got[sample(TTFT + "_count", **pair)] == 2
    assert got[sample(TTFT + "_bucket", **pair, le="0.1")] == 0
    assert got[sample(TTFT + "_bucket", **pair, le="0.2")] == 1
    assert got[sample(TTFT + "_bucket", **pair, le="2.0")] == 1
    assert got[sample(TTFT + "_bucket", **pair, le="3.0")] == 2
    assert got[sample(TTFT + "_sum", **pair)] == pytest.approx(2.65)
    assert not [k for k in got if k[0].startswith(TTFT) and dict(k[1])["deployment"] != "d1"]

    def tokens(deployment: str, kind: str) -> float:
        return got[sample("flywheel_tokens_total", route="chat", deployment=deployment, kind=kind)]

    assert (tokens("d1", "prompt"), tokens("d1", "completion")) == (300, 120)
    assert (tokens("d2", "prompt"), tokens("none", "prompt")) == (7, 0)
    cost = {
        dict(k[1])["deployment"]: v for k, v in got.items() if k[0] == "flywheel_cost_usd_total"
    }
    assert cost == pytest.approx({"d1": 0.75, "d2": 0.5, "none": 0.0})
    retries = {
        dict(k[1])["deployment"]: v for k, v in got.items() if k[0] == "flywheel_retries_total"
    }
    assert retries == {"d1": 3, "d2": 0, "none": 0}


def some_traffic(counter: RequestCounter, n: int) -> None:
    for i in range(n):
        counter.observe(rec(latency_ms=3.0 + 40 * i, cost=0.01, prompt_tokens=i))
        counter.observe(rec(route="demo", deployment="mock-a", stream=True, ttft_ms=9.0 * i))


def test_mirror_sums_histograms_over_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes' mirrors write their files; the merge equals one process seeing it all.

    As prometheus_client's own tests do, the value class is swapped for its multiprocess
    one with a chosen pid, so each "process" writes its own files here."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    everything = RequestCounter(ROUTES)
    for pid, n in ((101, 3), (102, 5)):
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda pid=pid: pid))  # type: ignore[no-untyped-call]
        counter = RequestCounter(ROUTES)
        mirror = Mirror([GatewayCollector(counter)])
        # Two rounds: the second sync must add only what came since the first.
        for _ in range(2):
            some_traffic(counter, n)
            some_traffic(everything, n)
            mirror.sync()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    families = (DURATION, TTFT, "flywheel_cost_usd", "flywheel_requests")
    merged = exposed(generate_latest(registry).decode(), *families)
    expected = scrape(everything, *families)
    assert merged.keys() == expected.keys()
    assert merged == pytest.approx(expected)
    assert merged[bucket("chat", "d1", "2xx", "miss", "+Inf")] == 16
