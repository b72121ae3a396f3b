"""Metrics through real processes: `uvicorn --workers 2` in multiprocess mode, an arq worker.

A scrape reaches one gateway process at random; with PROMETHEUS_MULTIPROC_DIR every
scrape must show the sum over both. And after a metrics job run, the history shows the
requests that were sent (through the request stream, the consolidator and the database).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from arq.connections import RedisSettings, create_pool
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ROOT, free_port, start_worker, stop, wait_for

pytestmark = pytest.mark.e2e


@dataclass
class Rig:
    url: str
    route: str  # its own, so history counts are this module's alone
    prefix: str
    prom_dir: Path
    log: Path
    gateway: subprocess.Popen[bytes]
    sent: int = 0  # requests sent to the route by the tests so far
    prompt_tokens: int = 0  # each request's: they all send the same message


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, database_url: str, key_prefix: str
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("metrics-mp")
    route = f"acc-{uuid.uuid4().hex[:8]}"
    mock = {"provider": "mock", "model": "mock-1", "mock": {"latency_ms": 5, "jitter_ms": 1}}
    routes = {"routes": {route: {"deployments": [{"name": "mock", **mock}]}}}
    (tmp / "routes.yaml").write_text(yaml.safe_dump(routes))
    prom_dir = tmp / "prom"
    prom_dir.mkdir()
    port = free_port()
    prefix = f"{key_prefix}mp{uuid.uuid4().hex[:6]}:"  # its own queue and job outcomes
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PROMETHEUS"))},
        "FLYWHEEL_CONFIG": str(tmp / "routes.yaml"),
        "FLYWHEEL_VAR_DIR": str(tmp),
        "FLYWHEEL_REDIS_PREFIX": prefix,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
    }
    log = tmp / "processes.log"
    with log.open("wb") as out:
        worker = start_worker(env, out)
        gateway = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "app.main:app", "--workers", "2"),
                *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc=gateway, timeout_s=30)
        yield Rig(url, route, prefix, prom_dir, log, gateway)
    finally:
        stop(gateway)
        stop(worker)


def fresh(url: str) -> httpx.Client:
    """A client whose every request opens a new connection, so any process may answer."""
    return httpx.Client(base_url=url, headers={"connection": "close"}, timeout=10)


def send(rig: Rig, n: int) -> None:
    body = {"model": rig.route, "messages": [{"role": "user", "content": "count me"}]}

    async def go() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=rig.url, limits=limits, timeout=10) as client:
            gate = asyncio.Semaphore(8)

            async def one() -> None:
                async with gate:
                    resp = await client.post("/v1/chat/completions", json=body)
                    assert resp.status_code == 200, resp.text
                    rig.prompt_tokens = resp.json()["usage"]["prompt_tokens"]

            await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(go())
    rig.sent += n


def scrape(client: httpx.Client) -> tuple[float, float]:
    """(requests counted, live processes) from one scrape, which must parse."""
    text = client.get("/metrics").text
    requests = processes = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "flywheel_requests_total":
                requests += s.value
            elif s.name == "flywheel_gateway_processes":
                processes = s.value
    return requests, processes


def per_process(client: httpx.Client) -> dict[int, int]:
    """Requests each gateway process counted itself, from summaries until both answered."""
    seen: dict[int, int] = {}
    for _ in range(200):
        summary = client.get("/metrics/summary").json()
        assert summary["process"]["multiprocess_metrics"] is True
        seen[summary["process"]["pid"]] = summary["requests"]["total"]
        if len(seen) == 2:
            break
    return seen


def send_to_both(rig: Rig, client: httpx.Client) -> None:
    """Send until both processes have served some, so each one's own count is less than
    the total (the kernel may hand one process every connection for a while)."""
    for _ in range(10):
        send(rig, 30)
        counts = per_process(client)
        if len(counts) == 2 and all(counts.values()):
            break
    assert len(counts) == 2, "one process answered every connection"
    assert all(counts.values()), f"one process served nothing: {counts}"
    assert sum(counts.values()) == rig.sent
    deadline = time.monotonic() + 5  # each process mirrors its counts every second
    while scrape(client)[0] != rig.sent and time.monotonic() < deadline:
        time.sleep(0.2)


def test_every_scrape_sums_both_worker_processes(rig: Rig) -> None:
    with fresh(rig.url) as client:
        send_to_both(rig, client)
        # Whichever process answers, the scrape is the sum over both.
        assert {scrape(client) for _ in range(20)} == {(rig.sent, 2.0)}


def histogram(client: httpx.Client, route: str) -> tuple[float, ...]:
    """The route's latency histogram (count, le=0.25 and +Inf buckets, sum) and its
    prompt tokens, from one scrape."""
    text = client.get("/metrics").text
    got = dict.fromkeys(("count", "0.25", "+Inf", "sum", "tokens"), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("route") != route:
                continue
            if s.name == "flywheel_request_duration_seconds_bucket":
                if s.labels["le"] in got:
                    got[s.labels["le"]] += s.value
            elif s.name.startswith("flywheel_request_duration_seconds_"):  # _count, _sum
                got[s.name.rsplit("_", 1)[1]] += s.value
            elif s.name == "flywheel_tokens_total" and s.labels["kind"] == "prompt":
                got["tokens"] += s.value
    return tuple(got.values())


def test_histograms_sum_both_worker_processes(rig: Rig) -> None:
    with fresh(rig.url) as client:
        send_to_both(rig, client)
        scrapes = {histogram(client, rig.route) for _ in range(20)}
    assert len(scrapes) == 1, scrapes  # whichever process answers
    count, fast, inf, total_s, tokens = scrapes.pop()
    # Every request in the histogram once, all of them quick (a 5 ms mock), with their
    # latencies summed; and every request's prompt tokens.
    assert (count, fast, inf) == (rig.sent, rig.sent, rig.sent)
    assert 0.004 * rig.sent < total_s < 0.25 * rig.sent
    assert tokens == rig.sent * rig.prompt_tokens > 0


def test_history_counts_what_was_sent_after_a_job_run(rig: Rig, redis_url: str) -> None:
    send(rig, 5)  # on top of the other test's, when it ran first

    async def run_job() -> None:
        pool = await create_pool(
            RedisSettings.from_dsn(redis_url), default_queue_name=rig.prefix + "queue"
        )
        try:
            job = await pool.enqueue_job("persist_metrics")
            assert job is not None
            await job.result(timeout=30)
        finally:
            await pool.aclose()

    with fresh(rig.url) as client:
        deadline = time.monotonic() + 30
        counted = -1
        while time.monotonic() < deadline:
            asyncio.run(run_job())  # rows reach the database a moment after the answers
            history = client.get("/metrics/history", params={"hours": 1}).json()
            counted = sum(
                p["requests"]
                for s in history["series"]
                if s["route"] == rig.route
                for p in s["points"]
            )
            if counted == rig.sent:
                break
            time.sleep(0.5)
    assert counted == rig.sent


def test_stopped_processes_leave_their_counts_not_their_gauges(rig: Rig) -> None:
    stop(rig.gateway)
    files = sorted(p.name for p in rig.prom_dir.iterdir())
    assert any(f.startswith("counter_") for f in files), files
    assert any(f.startswith("histogram_") for f in files), files
    assert not [f for f in files if f.startswith("gauge_live")], files
