"""Gateway requests as LangSmith runs, against a fake LangSmith API on loopback.

Runs arrive (through the real langsmith client and its wire format) with token counts,
metadata and redacted content; "none" sends no content; feedback lands on the request's
run; a failing LangSmith is counted and logged once; a hanging one never slows `submit`,
keeps memory bounded and cannot hold `close` past its timeout.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from langsmith import Client

from app.config import Settings
from app.observability.langsmith_runs import LangSmithRuns, make_langsmith, run_id
from app.observability.redact import Redactor
from app.store.records import RequestRecord
from tests.fakes.langsmith_fake import LangSmithFake

KEY = "lsv2_pt_0123456789abcdef0123456789abcdef_0123456789"
PROJECT = "flywheel-test"
EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
PROVIDER_KEY = "sk-proj-AbCdEf0123456789AbCdEf0123456789"
PLANTED = (EMAIL, CARD, PROVIDER_KEY)
REDACTOR = Redactor()

CHAT_REQUEST: dict[str, Any] = {
    "model": "support",
    "temperature": 0.2,
    "max_tokens": 64,
    "messages": [
        {"role": "system", "content": "You are a helpful support agent."},
        {"role": "user", "content": f"I am {EMAIL}, card {CARD}, my key is {PROVIDER_KEY}"},
    ],
}
CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-x",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": f"Noted {EMAIL}; never share {CARD}."},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 31,
        "completion_tokens": 12,
        "total_tokens": 43,
        "prompt_tokens_details": {"cached_tokens": 8},
    },
}


def record(request_id: str, **overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "endpoint": "chat.completions",
        "route": "support",
        "deployment": "openai-mini",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "status": 200,
        "stream": False,
        "started_at": time.time() - 1,
        "latency_ms": 842.5,
        "ttft_ms": 120.0,
        "prompt_tokens": 31,
        "completion_tokens": 12,
        "cost": 0.0000123,
        "finish_reason": "stop",
        "attempts": 2,
        "cache": "miss",
        "variant": "v2",
        "tenant": "acme",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }
    return RequestRecord(**{**fields, **overrides})


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def received(fake: LangSmithFake) -> bytes:
    """Every write body the fake received, decompressed, as one blob to search."""
    return b"\n".join(fake.ls.bodies)


@pytest.fixture
def fake() -> Iterator[LangSmithFake]:
    with LangSmithFake(KEY) as server:
        yield server


@contextmanager
def langsmith_runs(fake: LangSmithFake, key: str = KEY, **settings: Any) -> Iterator[LangSmithRuns]:
    runs = make_langsmith(
        Settings(
            _env_file=None,
            langsmith_tracing=True,
            langsmith_api_key=key,
            langsmith_endpoint=fake.url,
            langsmith_project=PROJECT,
            **settings,
        )
    )
    assert runs is not None
    runs.start()
    try:
        yield runs
    finally:
        runs.close(timeout=2.0)


def test_off_unless_tracing_and_a_key() -> None:
    assert make_langsmith(Settings(_env_file=None, langsmith_api_key=KEY)) is None
    assert make_langsmith(Settings(_env_file=None, langsmith_tracing=True)) is None
    assert run_id("chatcmpl-1") == run_id("chatcmpl-1") != run_id("chatcmpl-2")
    assert run_id("chatcmpl-1").version == 5


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "batch-fallback"])
def test_runs_arrive_with_usage_metadata_and_redacted_content(multipart: bool) -> None:
    with LangSmithFake(KEY, multipart=multipart) as fake, langsmith_runs(fake) as runs:
        ok = record("chatcmpl-ok")
        failed = record(
            "chatcmpl-failed",
            status=502,
            completion_tokens=0,
            finish_reason=None,
            error_type="upstream_error",
            error_code="bad_gateway",
        )
        embed = record("req-embed", endpoint="embeddings", route="embed", prompt_tokens=5)
        embed_request = {"model": "embed", "input": [f"write to {EMAIL}"]}
        embed_response = {
            "object": "list",
            "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25] * 8}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }
        runs.submit(ok, CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        runs.submit(failed, CHAT_REQUEST, None, REDACTOR)
        runs.submit(embed, embed_request, embed_response, REDACTOR)
        wait_until(lambda: runs.sent == 3)

        assert runs.failures == runs.dropped == 0
        rid = str(run_id("chatcmpl-ok"))
        run = fake.ls.runs[rid]
        assert (run["run_type"], run["name"], run["session_name"]) == (
            "llm",
            "flywheel support",
            PROJECT,
        )
        assert run["trace_id"] == rid
        assert run["dotted_order"].endswith(rid)
        started = datetime.fromisoformat(run["start_time"])
        ended = datetime.fromisoformat(run["end_time"])
        assert started.timestamp() == pytest.approx(ok.started_at, abs=1e-3)
        assert (ended - started).total_seconds() * 1000 == pytest.approx(842.5, abs=0.01)
        assert run["outputs"]["usage_metadata"] == {
            "input_tokens": 31,
            "output_tokens": 12,
            "total_tokens": 43,
            "total_cost": 0.0000123,
            "input_token_details": {"cache_read": 8},
        }
        assert "usage" not in run["outputs"]
        meta = run["extra"]["metadata"]
        assert {k: meta[k] for k in ("route", "deployment", "provider", "model", "variant")} == {
            "route": "support",
            "deployment": "openai-mini",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "variant": "v2",
        }
        assert (meta["cache"], meta["attempts"], meta["request_id"]) == ("miss", 2, "chatcmpl-ok")
        assert (meta["tenant"], meta["ttft_ms"], meta["status"]) == ("acme", 120.0, 200)
        assert meta["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        assert (meta["ls_provider"], meta["ls_model_name"]) == ("openai", "gpt-4o-mini")
        assert "route:support" in run["tags"]
        assert "variant:v2" in run["tags"]
        assert "cache:miss" in run["tags"]
        user = run["inputs"]["messages"][1]["content"]
        assert user == "I am [EMAIL], card [CARD], my key is [SECRET]"
        answer = run["outputs"]["choices"][0]["message"]["content"]
        assert answer == "Noted [EMAIL]; never share [CARD]."

        bad = fake.ls.runs[str(run_id("chatcmpl-failed"))]
        assert bad["error"] == "upstream_error bad_gateway (HTTP 502)"
        assert bad["outputs"]["usage_metadata"]["input_tokens"] == 31

        vectors = fake.ls.runs[str(run_id("req-embed"))]
        assert vectors["inputs"]["input"] == ["write to [EMAIL]"]
        assert vectors["outputs"]["embeddings"] == 1
        assert vectors["outputs"]["dimensions"] == 8
        assert "data" not in vectors["outputs"]

        blob = received(fake)
        for secret in PLANTED:
            assert secret.encode() not in blob
        for mask in (b"[EMAIL]", b"[CARD]", b"[SECRET]"):
            assert mask in blob
        # One request for the three runs, on the endpoint the server supports.
        endpoint = "/runs/multipart" if multipart else "/runs/batch"
        assert fake.ls.writes == [(endpoint, 3)]
        headers = [{k.lower(): v for k, v in seen.headers.items()} for seen in fake.seen]
        assert all(h.get("x-api-key") == KEY for h in headers)
        assert fake.ls.rejected == 0


def test_content_none_sends_no_content(fake: LangSmithFake) -> None:
    with langsmith_runs(fake, flywheel_langsmith_content="none") as runs:
        runs.submit(record("chatcmpl-quiet"), CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        wait_until(lambda: runs.sent == 1)
        runs.feedback("chatcmpl-quiet", 1.0, f"thanks, write to {EMAIL}")
        wait_until(lambda: runs.sent == 2)

    run = fake.ls.runs[str(run_id("chatcmpl-quiet"))]
    assert run["inputs"] == {
        "model": "support",
        "temperature": 0.2,
        "max_tokens": 64,
        "messages_count": 2,
    }
    assert run["outputs"] == {
        "finish_reason": "stop",
        "usage_metadata": {
            "input_tokens": 31,
            "output_tokens": 12,
            "total_tokens": 43,
            "total_cost": 0.0000123,
            "input_token_details": {"cache_read": 8},
        },
    }
    assert fake.ls.feedback[0]["score"] == 1.0
    assert fake.ls.feedback[0].get("comment") is None
    blob = received(fake)
    for text in (*PLANTED, "helpful support agent", "Noted", "[EMAIL]", "thanks"):
        assert text.encode() not in blob


def test_feedback_arrives_for_the_requests_run(fake: LangSmithFake) -> None:
    scored = record("chatcmpl-scored")
    with langsmith_runs(fake) as runs:
        runs.submit(scored, CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        wait_until(lambda: runs.sent == 1)
        # The worker that sends feedback reads the request's start with the score.
        started = datetime.fromtimestamp(scored.started_at, UTC)
        runs.feedback("chatcmpl-scored", 0.25, f"wrong, mail {EMAIL}", started)
        runs.feedback("chatcmpl-scored", 1.0, None, key="judge")
        wait_until(lambda: runs.sent == 3)

    rid = str(run_id("chatcmpl-scored"))
    user, judge = fake.ls.feedback
    assert (user["run_id"], user["trace_id"], user["key"], user["score"]) == (
        rid,
        rid,
        "user_score",
        0.25,
    )
    assert user["comment"] == "wrong, mail [EMAIL]"
    assert user["session_id"] == fake.ls.projects[PROJECT]
    assert datetime.fromisoformat(user["start_time"]) == datetime.fromisoformat(
        fake.ls.runs[rid]["start_time"]
    )
    assert (judge["run_id"], judge["key"], judge["score"]) == (rid, "judge", 1.0)
    assert EMAIL.encode() not in received(fake)


def test_rejected_key_is_counted_logged_once_and_never_logged(
    fake: LangSmithFake, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "lsv2_pt_ffffffffffffffffffffffffffffffff_ffffffffff"
    caplog.set_level(logging.INFO)
    with langsmith_runs(fake, key=wrong) as runs:
        for i in range(3):
            runs.submit(record(f"chatcmpl-{i}"), CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
            wait_until(lambda i=i: runs.failures == i + 1)  # type: ignore[misc]
        runs.feedback("chatcmpl-0", 0.5, None)
        wait_until(lambda: runs.failures == 4)
        assert runs.sent == 0

    assert fake.ls.rejected >= 4
    assert fake.ls.runs == {}
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in loud] == ["flywheel.langsmith"]
    assert "LangSmithAuthError" in loud[0].getMessage()
    for r in caplog.records:
        assert wrong[:12] not in r.getMessage()
        assert wrong[-6:] not in r.getMessage()


def test_an_outage_is_logged_once_and_its_end_noticed(
    fake: LangSmithFake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flywheel.langsmith")
    fake.ls.fail_status = 503
    with langsmith_runs(fake) as runs:
        for i in range(3):
            runs.submit(record(f"chatcmpl-down-{i}"), CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
            wait_until(lambda i=i: runs.failures == i + 1)  # type: ignore[misc]
        fake.ls.fail_status = None
        runs.submit(record("chatcmpl-up"), CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        wait_until(lambda: runs.sent == 1)

    assert list(fake.ls.runs) == [str(run_id("chatcmpl-up"))]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1
    assert "being lost" in loud[0].getMessage()
    assert any("keeps up again" in r.getMessage() for r in caplog.records)


def test_close_flushes_what_is_queued_in_batches(fake: LangSmithFake) -> None:
    records = [record(f"chatcmpl-{i}") for i in range(250)]
    with langsmith_runs(fake) as runs:
        for rec in records:
            runs.submit(rec, CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        runs.feedback("chatcmpl-249", 1.0, None)
        runs.close(timeout=10.0)
        assert (runs.sent, runs.failures, runs.dropped, runs.pending) == (251, 0, 0, 0)

    assert len(fake.ls.runs) == 250
    sizes = [n for _, n in fake.ls.writes]  # batches of at most 100: 100, 100, 50
    assert sum(sizes) == 250
    assert max(sizes) == 100
    assert len(sizes) <= 4
    assert fake.ls.feedback[0]["run_id"] == str(run_id("chatcmpl-249"))


def test_a_hanging_langsmith_never_slows_submit_nor_close(fake: LangSmithFake) -> None:
    capacity = 100
    with langsmith_runs(fake, flywheel_langsmith_queue=capacity) as runs:
        fake.ls.hang()
        runs.submit(record("chatcmpl-stuck"), CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        wait_until(lambda: fake.ls.held >= 1)  # the worker waits on LangSmith now

        records = [record(f"chatcmpl-{i}") for i in range(1000)]
        started = time.perf_counter()
        for rec in records:
            runs.submit(rec, CHAT_REQUEST, CHAT_RESPONSE, REDACTOR)
        for rec in records[:100]:
            runs.feedback(rec.request_id, 0.5, "fine")
        submit_s = time.perf_counter() - started
        # ~1 µs each: a submit that waited on LangSmith (10 s read timeout) could not.
        assert submit_s < 0.05, f"1100 submits took {submit_s * 1000:.1f} ms"
        # Memory is bounded by the queue: the oldest runs went, counted.
        assert runs.pending == 2 * capacity
        assert runs.dropped == 1000 - capacity

        started = time.perf_counter()
        runs.close(timeout=1.0)
        close_s = time.perf_counter() - started
        assert close_s < 1.5, f"close took {close_s:.2f} s"
        assert runs.pending == 0
        assert runs.dropped == 1000 + 100  # and what close could not send
        assert runs.sent == 0

        fake.ls.release()
        # The run LangSmith held arrives once it answers; nothing else was sent.
        wait_until(lambda: runs.sent == 1)
        assert list(fake.ls.runs) == [str(run_id("chatcmpl-stuck"))]


def test_fake_speaks_the_clients_own_compressed_batching(fake: LangSmithFake) -> None:
    # The library's default path (auto batching, zstd multipart, feedback parts), so the
    # fake is known to read what a real client sends, not only what our module sends.
    client = Client(api_url=fake.url, api_key=KEY, auto_batch_tracing=True)
    try:
        wait_until(lambda: client.compressed_traces is not None)  # after its GET /info
        rid = uuid.uuid4()
        start = datetime.now(UTC)
        client.create_run(
            "probe",
            {"question": "hi"},
            "llm",
            id=rid,
            trace_id=rid,
            dotted_order=f"{start:%Y%m%dT%H%M%S%fZ}{rid}",
            start_time=start,
            end_time=start,
            outputs={"answer": "hello"},
            project_name="probe",
        )
        client.create_feedback(
            run_id=rid, trace_id=rid, key="probe", score=1, session_id=fake.ls.project_id("probe")
        )
        client.flush(timeout=10)
        wait_until(lambda: str(rid) in fake.ls.runs and fake.ls.feedback)
    finally:
        client.close(timeout=0)

    assert "zstd" in fake.ls.encodings
    run = fake.ls.runs[str(rid)]
    assert (run["name"], run["inputs"], run["outputs"]) == (
        "probe",
        {"question": "hi"},
        {"answer": "hello"},
    )
    assert fake.ls.feedback[0]["run_id"] == str(rid)
