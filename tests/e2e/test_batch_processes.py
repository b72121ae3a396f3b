"""The Batch API's acceptance with real processes: a gateway under uvicorn, arq workers,
the fake OpenAI upstream on loopback, the real Redis and database, the official SDK.

- 1,000 lines uploaded, run against a mock route and downloaded, `custom_id`s intact;
  a malformed line refused at upload with its line number.
- A worker SIGKILLed mid-batch (lines in flight at the upstream) and a new one started:
  the batch completes; every line was answered by the upstream exactly once (the fake
  counts what it answered in full: a request whose caller died is not answered); the
  lines in flight at the kill were sent again, the finished ones never.
- A cancel mid-way stops new lines within seconds; the batch reports partial counts.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import psutil
import pytest
from redis import Redis

from tests.conftest import create_key
from tests.e2e.conftest import free_port, process_env, start_gateway, start_worker, stop, wait_for
from tests.fakes.openai_fake import openai_fake
from tests.fakes.server import FakeServer, FakeState

pytestmark = pytest.mark.e2e

MASTER = "sk-master-e2e-batch-0123456789"
SLOW_MS = 200


@dataclass
class Rig:
    url: str
    env: dict[str, str]
    upstream: FakeServer
    log: Any
    worker: Any
    mock_route: str
    slow_route: str

    def restart_worker(self, kill: bool = False) -> None:
        if kill:
            self.worker.kill()
            self.worker.wait()
        else:
            stop(self.worker)
        self.worker = start_worker(self.env, self.log)


def _routes(mock: str, slow: str, base: str) -> dict[str, Any]:
    return {
        "routes": {
            mock: {
                "deployments": [
                    {"name": "mock-a", "provider": "mock", "model": "mock-1"},
                ],
            },
            slow: {
                "retries": 0,
                "cache": {"mode": "off"},
                "deployments": [
                    {
                        "name": "slow-a",
                        "provider": "openai_compatible",
                        "model": f"slow-{SLOW_MS}",
                        "api_base": base + "/v1",
                        "api_key_env": "OPENAI_API_KEY",
                        "input_cost_per_1k": 0.001,
                        "output_cost_per_1k": 0.002,
                    }
                ],
            },
        }
    }


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, database_url: str, key_prefix: str
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("batches")
    mock, slow = f"bmock-{uuid.uuid4().hex[:6]}", f"bslow-{uuid.uuid4().hex[:6]}"
    prefix = f"{key_prefix}batch{uuid.uuid4().hex[:6]}:"
    with openai_fake() as upstream:
        env = process_env(
            tmp,
            _routes(mock, slow, upstream.url),
            redis_url,
            database_url,
            prefix,
            FLYWHEEL_MASTER_KEY=MASTER,
            FLYWHEEL_BATCH_LEASE_S="3",
            FLYWHEEL_BATCH_POLL_S="0.3",
            FLYWHEEL_BATCH_CONCURRENCY="8",
            FLYWHEEL_CYCLE_INTERVAL_S="3600",
            OPENAI_API_KEY="sk-e2e-openai-0123456789",
        )
        port = free_port()
        log = (tmp / "processes.log").open("wb")
        worker = start_worker(env, log)
        gateway = start_gateway(env, port, log, "--no-access-log")
        rig = Rig(f"http://127.0.0.1:{port}", env, upstream, log, worker, mock, slow)
        try:
            wait_for(f"{rig.url}/health", proc=gateway)
            yield rig
        finally:
            for proc in (gateway, rig.worker):
                stop(proc)
            log.close()
        redis = Redis.from_url(redis_url)
        keys = list(redis.scan_iter(match=f"{prefix}*"))
        if keys:
            redis.delete(*keys)
        redis.close()


def _client(rig: Rig, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=rig.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _chat_line(custom_id: str, route: str, text: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": route, "messages": [{"role": "user", "content": text}]},
    }


def _wait_status(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch stuck at {batch.status}: {batch}"
        time.sleep(0.2)


def _file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in client.files.content(file_id).read().splitlines()]


def _sent_texts(state: FakeState) -> list[str]:
    """The last message of every chat request the fake received."""
    return [
        str(s.body["messages"][-1].get("content"))
        for s in list(state.seen)
        if isinstance(s.body, dict) and s.body.get("messages")
    ]


def test_sdk_uploads_runs_and_downloads_a_thousand_line_batch(rig: Rig) -> None:
    key = asyncio.run(create_key(rig.url, MASTER, name="batch-owner"))["key"]
    client = _client(rig, key)
    ids = [f"req-{i:04d}" for i in range(1000)]
    lines = [_chat_line(cid, rig.mock_route, f"question {cid}") for cid in ids]

    bad = [*lines[:2], {"custom_id": "x", "method": "POST"}, *lines[3:5]]
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", io.BytesIO(_jsonl(bad))), purpose="batch")
    assert "Line 3" in refused.value.message

    uploaded = client.files.create(file=("batch.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert uploaded.purpose == "batch"
    assert uploaded.bytes == len(_jsonl(lines))
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "acceptance"},
    )
    assert batch.status == "validating"
    assert batch.metadata == {"job": "acceptance"}

    done = _wait_status(client, batch.id, {"completed", "failed"}, 180)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (1000, 1000)
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(done, stamp) is not None, stamp
    assert done.usage is not None
    assert done.usage.input_tokens > 0

    out = _file_lines(client, done.output_file_id)
    assert len(out) == 1000
    assert sorted(line["custom_id"] for line in out) == ids
    first = out[0]
    assert first["id"].startswith("batch_req_")
    assert first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["object"] == "chat.completion"
    assert first["response"]["body"]["choices"][0]["message"]["content"]
    listed = client.files.list(purpose="batch_output")
    assert done.output_file_id in {f.id for f in listed.data}

    # The worker runs below the gateway's CPU priority (FLYWHEEL_WORKER_NICE, 10).
    assert psutil.Process(rig.worker.pid).nice() >= 10
    metrics = httpx.get(rig.url + "/metrics", timeout=10).text
    assert 'flywheel_batch_lines_total{endpoint="/v1/chat/completions",outcome="completed"}' in (
        metrics
    )


def test_a_killed_worker_resumes_without_running_a_line_twice(rig: Rig) -> None:
    client = _client(rig, MASTER)
    tag = uuid.uuid4().hex[:8]
    texts = [f"{tag}-line-{i}" for i in range(120)]
    lines = [_chat_line(f"c{i}", rig.slow_route, text) for i, text in enumerate(texts)]
    state = rig.upstream.state

    def received() -> Counter[str]:
        return Counter(text for text in _sent_texts(state) if text.startswith(tag))

    def answered() -> int:
        return sum(n for text, n in list(state.answered.items()) if text.startswith(tag))

    uploaded = client.files.create(file=("slow.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while answered() < 30:
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.05)
    # Hold the upstream's answers, let the answers already sent reach the journal, then
    # kill the worker while lines are in flight at the upstream.
    state.hold = True
    try:
        time.sleep(0.5)
        in_flight = sum(received().values()) - answered()
        assert in_flight > 0, "no line in flight at the kill"
        before_kill = answered()
        rig.restart_worker(kill=True)
        time.sleep(0.3)
    finally:
        state.hold = False

    done = _wait_status(client, batch.id, {"completed", "failed"}, 90)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.completed == 120
    out = _file_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"c{i}" for i in range(120))

    got = {text: state.answered[text] for text in texts}
    assert all(n == 1 for n in got.values()), {t: n for t, n in got.items() if n != 1}
    sent = received()
    twice = [t for t in texts if sent[t] > 1]
    # What was in flight at the kill went again; nothing answered before it did.
    assert 0 < len(twice) <= in_flight
    assert before_kill >= 30


def test_cancel_stops_new_lines_within_seconds_and_reports_partial_counts(rig: Rig) -> None:
    client = _client(rig, MASTER)
    tag = uuid.uuid4().hex[:8]
    lines = [_chat_line(f"k{i}", rig.slow_route, f"{tag}-{i}") for i in range(400)]
    state = rig.upstream.state

    def sent() -> int:
        return sum(1 for text in _sent_texts(state) if text.startswith(tag))

    uploaded = client.files.create(file=("c.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while sent() < 40:
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.05)
    cancelled = client.batches.cancel(batch.id)
    asked = time.monotonic()
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None

    done = _wait_status(client, batch.id, {"cancelled"}, 30)
    stopped = sent()
    time.sleep(1.5)
    assert sent() == stopped, "lines still being sent after the batch was cancelled"
    assert time.monotonic() - asked < 10
    counts = done.request_counts
    assert counts is not None
    assert counts.total == 400
    assert 0 < counts.completed < 400
    assert counts.completed + counts.failed < 400
    assert stopped < 400
    out = _file_lines(client, done.output_file_id)
    errors = _file_lines(client, done.error_file_id)
    assert len(out) == counts.completed
    unrun = [e for e in errors if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(unrun) == 400 - counts.completed - counts.failed
    assert done.cancelled_at is not None
