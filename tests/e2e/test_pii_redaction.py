"""PII and secrets planted in prompts and in an upstream's error reach no log, span,
LangSmith payload, stored row, Redis key or metric, with real processes.

A gateway under uvicorn (DEBUG logging, the access log with bodies on, OTLP tracing to a
fake collector, LangSmith to a fake LangSmith) and an arq worker serve: a prompt holding
an e-mail address, a Luhn-valid card number and a provider key, as JSON and as a stream,
on a route that stores its bodies; the same prompt to an upstream that quotes it back in
its error; feedback whose comment holds the e-mail. Then everything the system produced
is searched for the planted values: both processes' output, the spans the collector got,
every body LangSmith got, every row of every table, every Redis key under the prefix and
/metrics. The masks must be where the values were (the search is not vacuous): stored
bodies and LangSmith runs hold `[EMAIL]`, `[CARD]` and `[SECRET]`, and LangSmith got the
runs with their token counts and the feedback for the right run.

The client's own answer may hold them (the fake upstream echoes the prompt) and so may
the response cache, which must answer with what the model said: this route does not cache.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.observability.langsmith_runs import run_id
from tests.e2e.conftest import free_port, process_env, start_gateway, start_worker, stop, wait_for
from tests.e2e.test_secret_leaks import (
    Corpus,
    Planted,
    dump_database,
    dump_files,
    dump_redis,
    find_leaks,
    wait_for_records,
)
from tests.fakes.langsmith_fake import LangSmithFake
from tests.fakes.otlp_collector import otlp_collector
from tests.fakes.server import FakeServer

pytestmark = pytest.mark.e2e

LANGSMITH_KEY = "lsv2_pt_" + secrets.token_hex(16) + "_" + secrets.token_hex(5)
PROVIDER_KEY = "sk-e2e-pii-" + secrets.token_hex(12)
WEBHOOK = "https://hooks.slack.com/services/T0PII/B0PII/" + secrets.token_hex(12)


@dataclass
class Rig:
    url: str
    prefix: str
    tmp: Path
    collector: FakeServer
    langsmith: LangSmithFake


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    openai_upstream: FakeServer,
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("pii")
    base = {
        "provider": "openai_compatible",
        "api_base": openai_upstream.url + "/v1",
        "api_key_env": "OPENAI_API_KEY",
    }
    routes = {
        "kept": {
            "deployments": [{"name": "fake", "model": "gpt-fake", **base}],
            "bodies": {"store": True},
        },
        "quoting": {
            "deployments": [{"name": "quoter", "model": "echo-error", **base}],
            "retries": 0,
            "bodies": {"store": True},
        },
    }
    prefix = f"{key_prefix}pii{uuid.uuid4().hex[:6]}:"
    with otlp_collector() as collector, LangSmithFake(LANGSMITH_KEY) as langsmith:
        env = process_env(
            tmp,
            {"routes": routes},
            redis_url,
            database_url,
            prefix,
            FLYWHEEL_LOG_LEVEL="DEBUG",
            FLYWHEEL_ACCESS_LOG_BODIES="true",
            OPENAI_API_KEY=PROVIDER_KEY,
            FLYWHEEL_ALERT_WEBHOOK_URL=WEBHOOK,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
            LANGSMITH_TRACING="true",
            LANGSMITH_API_KEY=LANGSMITH_KEY,
            LANGSMITH_ENDPOINT=langsmith.url,
            LANGSMITH_PROJECT="pii-e2e",
        )
        log = (tmp / "processes.log").open("wb")
        worker = start_worker(env, log)
        port = free_port()
        gateway = start_gateway(env, port, log, "--no-access-log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url + "/health", proc=gateway)
            yield Rig(url, prefix, tmp, collector, langsmith)
        finally:
            stop(gateway)
            stop(worker)
            log.close()


def _wait(what: str, done: object, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not callable(done) or not done():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.2)


async def test_planted_pii_and_keys_reach_nothing_but_the_client(
    rig: Rig, database_url: str, redis_url: str
) -> None:
    email = f"jane.{uuid.uuid4().hex[:8]}@example.org"
    card = "4111 1111 1111 1111"  # Luhn-valid (a well-known test number)
    key = "sk-proj-" + secrets.token_urlsafe(30).replace("-", "x").replace("_", "y")
    groq = "gsk_" + secrets.token_hex(20)
    planted = [
        Planted("email", email),
        Planted("card", card),
        Planted("card digits", card.replace(" ", "")),
        Planted("provider key", key),
        Planted("groq key", groq),
        # The gateway's own secrets, never in a prompt: nowhere at all.
        Planted("LangSmith key", LANGSMITH_KEY),
        Planted("upstream key", PROVIDER_KEY),
        Planted("webhook", WEBHOOK),
    ]
    prompt = f"I am {email}, card {card}, and my keys are {key} and {groq}. Summarise."
    messages = [{"role": "user", "content": prompt}]
    async with httpx.AsyncClient(base_url=rig.url, timeout=20) as client:
        answered = await client.post(
            "/v1/chat/completions", json={"model": "kept", "messages": messages}
        )
        assert answered.status_code == 200, answered.text
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "kept", "messages": messages, "stream": True},
        ) as streamed:
            assert streamed.status_code == 200
            assert "[DONE]" in (await streamed.aread()).decode()
            streamed_id = streamed.headers["x-request-id"]
        quoted = await client.post(
            "/v1/chat/completions", json={"model": "quoting", "messages": messages}
        )
        assert quoted.status_code == 400, quoted.text  # the upstream's error, passed on
        rid = answered.json()["id"]
        feedback = await client.post(
            "/v1/feedback", json={"id": rid, "score": 0.5, "comment": f"reach me at {email}"}
        )
        assert feedback.status_code == 202
        metrics = await client.get("/metrics")
    ids = {rid: "json", streamed_id: "stream", quoted.headers["x-request-id"]: "quoted"}
    await wait_for_records(database_url, ids, within_s=30)

    # LangSmith got each request as a run, with tokens and masked content, and the
    # feedback on the right run (forwarded by the worker once stored).
    ls = rig.langsmith.ls
    runs = {str(run_id(r)): r for r in ids}
    _wait("LangSmith runs", lambda: set(runs) <= set(ls.runs))
    _wait(
        "LangSmith feedback", lambda: any(f.get("run_id") == str(run_id(rid)) for f in ls.feedback)
    )
    run = ls.runs[str(run_id(rid))]
    usage = run["outputs"]["usage_metadata"]
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0
    sent = str(run["inputs"])
    assert "[EMAIL]" in sent
    assert "[CARD]" in sent
    assert "[SECRET]" in sent
    given = next(f for f in ls.feedback if f.get("run_id") == str(run_id(rid)))
    assert given["score"] == 0.5
    # Spans arrive in batches: wait for the error request's server span.
    _wait("the spans", lambda: any(b"quoter" in s.body for s in rig.collector.state.seen))

    corpus = Corpus()
    dump_files(rig.tmp, corpus)  # both processes' output, line by line
    for i, seen in enumerate(rig.collector.state.seen):
        corpus.add(f"OTLP export {i}", seen.body)
    for i, body in enumerate(ls.bodies):
        corpus.add(f"LangSmith write {i}", body)
    await dump_database(database_url, corpus, {})
    await dump_redis(redis_url, rig.prefix, corpus, {})
    corpus.add("/metrics", metrics.text)
    assert find_leaks(corpus, planted) == []

    # Not vacuous: the bodies were stored, masked, and the processes logged the requests.
    stored = b"".join(data for where, data, _ in corpus.entries if "request_bodies" in where)
    for mask in (b"[EMAIL]", b"[CARD]", b"[SECRET]"):
        assert mask in stored
    logged = (rig.tmp / "processes.log").read_bytes()
    assert rid.encode() in logged  # its access-log line
    assert b"[EMAIL]" in logged  # a body, masked, in the access log
