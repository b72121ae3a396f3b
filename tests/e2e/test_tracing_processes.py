"""Tracing end to end with real processes: the gateway under uvicorn and an arq worker
export OTLP (http/protobuf) to a fake collector on loopback. A request sent with a
`traceparent` yields the gateway's spans (request, cache, routing, upstream attempt and
the upstream HTTP call) in that trace, the fake upstream receives a `traceparent` of the
same trace, and the worker's span for storing the request's record joins it too."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import free_port, process_env, start_gateway, start_worker, stop, wait_for
from tests.fakes.otlp_collector import CollectedSpan, collected, otlp_collector
from tests.fakes.server import FakeServer

MASTER = "fw-master-tracing-0123456789abcdef"


@pytest.fixture(scope="module")
def traced_system(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    openai_upstream: FakeServer,
) -> Iterator[tuple[str, FakeServer]]:
    tmp = tmp_path_factory.mktemp("tracing")
    deployment = {
        "name": "fake",
        "provider": "openai_compatible",
        "model": "gpt-fake",
        "api_base": openai_upstream.url + "/v1",
        "api_key_env": "OPENAI_API_KEY",
    }
    route = {"deployments": [deployment], "cache": {"mode": "on", "ttl_s": 60}}
    with otlp_collector() as collector:
        env = process_env(
            tmp,
            {"routes": {"r1": route}},
            redis_url,
            database_url,
            f"{key_prefix}tr{uuid.uuid4().hex[:6]}:",
            OPENAI_API_KEY="sk-e2e-trace-0123456789",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
            FLYWHEEL_MASTER_KEY=MASTER,
        )
        log = (tmp / "processes.log").open("wb")
        worker = start_worker(env, log)
        port = free_port()
        gateway = start_gateway(env, port, log, "--no-access-log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url + "/health", proc=gateway)
            yield url, collector
        finally:
            stop(gateway)
            stop(worker)
            log.close()


def _wait_for_spans(
    collector: FakeServer, trace_id: str, names: set[str], timeout_s: float = 20.0
) -> list[CollectedSpan]:
    deadline = time.monotonic() + timeout_s
    spans: list[CollectedSpan] = []
    while time.monotonic() < deadline:
        spans = [s for s in collected(collector.state) if s.trace_id == trace_id]
        if names <= {s.name for s in spans}:
            return spans
        time.sleep(0.2)
    pytest.fail(f"spans {sorted(names - {s.name for s in spans})} never arrived")


def test_one_trace_across_gateway_upstream_and_worker(
    traced_system: tuple[str, FakeServer], openai_upstream: FakeServer
) -> None:
    url, collector = traced_system
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    text = f"trace across processes {uuid.uuid4().hex}"
    resp = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "r1", "messages": [{"role": "user", "content": text}]},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        timeout=10,
    )
    assert resp.status_code == 200
    wanted = {"POST /v1/chat/completions", "cache.lookup", "route", "upstream fake"}
    spans = _wait_for_spans(collector, trace_id, wanted | {"consolidate request"})
    by_name = {s.name: s for s in spans}
    assert by_name["POST /v1/chat/completions"].parent_id == parent_id
    assert by_name["POST /v1/chat/completions"].service == "flywheel"
    stored = by_name["consolidate request"]
    assert stored.service == "flywheel-worker"
    assert stored.attributes["flywheel.request_id"] == resp.json()["id"]
    seen = next(s for s in openai_upstream.state.seen if text in str(s.body))
    assert seen.headers["traceparent"].split("-")[1] == trace_id
    # The exporter sends batches in the background: a request is not held up by it.
    assert float(resp.headers["x-flywheel-overhead-ms"]) < 100


def test_a_job_enqueued_by_a_request_joins_its_trace(
    traced_system: tuple[str, FakeServer],
) -> None:
    url, collector = traced_system
    trace_id = secrets.token_hex(16)
    resp = httpx.post(
        url + "/admin/snapshots",
        headers={
            "authorization": f"Bearer {MASTER}",
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        },
        timeout=30,
    )
    assert resp.status_code in (200, 201, 202), resp.text
    spans = _wait_for_spans(collector, trace_id, {"job snapshot_create"})
    job = next(s for s in spans if s.name == "job snapshot_create")
    assert job.service == "flywheel-worker"
    # Its parent is a span of the gateway's, in the same trace. The gateway exports its
    # spans in batches after the response; the worker's may well arrive first.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = [s for s in collected(collector.state) if s.trace_id == trace_id]
        if any(s.span_id == job.parent_id for s in spans):
            break
        time.sleep(0.2)
    gateway_ids = {s.span_id for s in spans if s.service == "flywheel"}
    assert job.parent_id in gateway_ids
