"""One batch run in-process by a worker's services, built as `workers.tasks.batches`
builds them, against the real database and Redis and the fake OpenAI upstream:
validation with line numbers; answered, failed and retried lines in the output and
error files; embeddings; expiry; resuming from a journal; leases; yielding to live
traffic; the owner key's RPM and budget.

The SDK round trip, a SIGKILLed worker and cancels through real processes are in
`tests/e2e/test_batch_processes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth.keys import KeyCreate, KeyStore
from app.config import Settings
from app.files.storage import FileStorage, new_file_id
from app.observability.batch_metrics import BatchSnapshot, BatchStats, read_batch_stats
from app.observability.tracing import Tracing, make_tracing
from app.routing.config import RoutesFile
from app.routing.live_queue import LiveQueueGate, live_queue_key
from app.runtime import open_state
from app.store.batch_runs import RUNNABLE, checkpoint, claim_next, move, release
from app.store.batch_slots import GlobalSlots
from app.store.batches import batch_object, create_batch, get_batch
from app.store.files import add_file, get_file
from app.store.metrics_history import as_utc
from app.store.schema import ApiKey, Batch, StoredFile
from tests.conftest import openai_route, routes_for
from tests.fakes.openai_fake import openai_fake
from tests.fakes.server import FakeServer
from workers import batch_line
from workers.batch_files import derived_id, result_line
from workers.batch_journal import Done, Journal
from workers.batch_run import BatchRun, BatchServices, now_utc
from workers.llm_calls import redactors_for
from workers.tasks.batches import SLOT_HOLD_S

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ATTEMPTS = 3  # FLYWHEEL_BATCH_LINE_ATTEMPTS here


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    with openai_fake() as fake:
        yield fake


def worker_routes(base: str, flaky_model: str) -> RoutesFile:
    once = {"retries": 0}  # the batch's own retries only, not the route's
    return routes_for(
        ok=openai_route(base, "gpt-fake"),
        bad=openai_route(base, "fail-400") | once,
        down=openai_route(base, "fail-500") | once,
        flaky=openai_route(base, flaky_model) | once,
        capped=openai_route(base, "cap-0") | once,
        emb=openai_route(base, "text-embedding-fake"),
        # One request at a time in this worker, and a short wait for that one.
        narrow=openai_route(base, "gpt-fake")
        | {"concurrency": {"initial": 1, "minimum": 1, "max_wait_factor": 0.1}},
    )


@contextlib.asynccontextmanager
async def worker_services(
    settings: Settings, routes: RoutesFile, worker_id: str, tracing: Tracing | None = None
) -> AsyncIterator[BatchServices]:
    """What `workers.tasks.batches.on_startup` builds (without its loop and helpers)."""
    tracing = tracing or Tracing("flywheel-test-worker", None)
    async with open_state(
        settings,
        routes,
        redactors_for(settings, routes),
        tracing,
        role="worker",
        max_connections=settings.flywheel_batch_global_concurrency * 2,
    ) as state:
        redis, prefix = state.redis, settings.flywheel_redis_prefix
        assert redis is not None
        gate = LiveQueueGate(redis, prefix)
        yield BatchServices(
            settings=settings,
            state=state,
            storage=FileStorage.from_settings(settings),
            slots=GlobalSlots(
                redis, prefix, settings.flywheel_batch_global_concurrency, SLOT_HOLD_S
            ),
            gate=gate,
            stats=BatchStats(redis, prefix, worker_id, gate),
            worker_id=worker_id,
        )


async def claim_mine(
    engine: AsyncEngine, worker: str, batch_id: str, lease_s: float, now: Any
) -> Batch | None:
    """`claim_next`, told to skip every other runnable batch in the shared database."""
    async with engine.connect() as conn:
        query = select(Batch.id).where(Batch.status.in_(RUNNABLE), Batch.id != batch_id)
        others = list((await conn.execute(query)).scalars())
    got = await claim_next(engine, worker, lease_s, now, skip=others)
    assert got is None or got.id == batch_id
    return got


def chat_line(custom_id: str, route: str, text: str, **extra: Any) -> dict[str, Any]:
    body = {"model": route, "messages": [{"role": "user", "content": text}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def embed_line(custom_id: str, route: str, text: str) -> dict[str, Any]:
    body = {"model": route, "input": text}
    return {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS, "body": body}


@dataclass
class Rig:
    settings: Settings
    services: BatchServices
    engine: AsyncEngine
    upstream: FakeServer
    flaky_model: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    batches: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def redis(self) -> Redis:
        assert self.services.state.redis is not None
        return self.services.state.redis

    @property
    def prefix(self) -> str:
        return self.settings.flywheel_redis_prefix

    def text(self, i: int) -> str:
        """Line i's message: unique to this test, so the fake's counts are its own."""
        return f"{self.tag}-{i}"

    async def key(self, **limits: Any) -> str:
        row, _ = await KeyStore(self.engine).create(KeyCreate(name=f"batch-{self.tag}", **limits))
        self.keys.append(row.id)
        return row.id

    async def input_file(self, lines: Sequence[dict[str, Any] | bytes], owner: str | None) -> str:
        file_id = new_file_id()
        data = b"".join((x if isinstance(x, bytes) else orjson.dumps(x) + b"\n") for x in lines)
        storage = self.services.storage
        size = await asyncio.to_thread(storage.write, file_id, [data])
        await add_file(
            self.engine,
            file_id=file_id,
            owner=owner,
            purpose="batch",
            filename="requests.jsonl",
            size=size,
            lines=len(lines),
            expires_at=None,
        )
        self.files.append(file_id)
        return file_id

    async def batch(
        self,
        lines: Sequence[dict[str, Any] | bytes],
        *,
        endpoint: str = CHAT,
        owner: str | None = None,
        **row: Any,
    ) -> Batch:
        file_id = await self.input_file(lines, owner)
        made = await create_batch(
            self.engine,
            owner=owner,
            endpoint=endpoint,
            input_file_id=file_id,
            completion_window="24h",
            metadata={"test": self.tag},
            output_expires_s=None,
            total=len(lines),
            now=now_utc(),
        )
        self.batches.append(made.id)
        self.files += [derived_id(made.id, "output"), derived_id(made.id, "errors")]
        if row:
            await self.set_row(made.id, **row)
        return made

    async def set_row(self, batch_id: str, **values: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(Batch).where(Batch.id == batch_id).values(**values))

    async def row(self, batch_id: str) -> Batch:
        found = await get_batch(self.engine, batch_id)
        assert found is not None
        return found

    async def claim(self, batch_id: str) -> Batch:
        lease_s = self.settings.flywheel_batch_lease_s
        claimed = await claim_mine(
            self.engine, self.services.worker_id, batch_id, lease_s, now_utc()
        )
        assert claimed is not None
        return claimed

    async def run(self, batch_id: str, timeout_s: float = 20.0) -> str | None:
        claimed = await self.claim(batch_id)
        return await asyncio.wait_for(BatchRun(self.services, claimed).run(), timeout_s)

    def read(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        raw = self.services.storage.path(file_id).read_bytes()
        return [orjson.loads(line) for line in raw.splitlines()]

    def journal(self, batch_id: str, writer: str = "reader") -> Journal:
        return Journal(self.settings.files_dir, batch_id, writer)

    def sent(self, text: str) -> int:
        """Requests the upstream received whose message or input is `text`."""
        n = 0
        for seen in list(self.upstream.seen):
            body = seen.body
            if not isinstance(body, dict):
                continue
            messages = body.get("messages") or []
            if body.get("input") == text or any(m.get("content") == text for m in messages):
                n += 1
        return n

    async def stats(self) -> BatchSnapshot:
        assert await self.services.stats.flush()
        return await read_batch_stats(self.redis, self.prefix)


@pytest.fixture
async def rig(
    make_settings: Callable[..., Settings],
    own_prefix: str,
    tmp_path: Path,
    engine: AsyncEngine,
    upstream: FakeServer,
) -> AsyncIterator[Rig]:
    settings = make_settings(
        flywheel_redis_prefix=own_prefix,
        flywheel_var_dir=tmp_path,
        openai_api_key="sk-test-secret-0123456789",
        flywheel_batch_concurrency=4,
        flywheel_batch_global_concurrency=8,
        flywheel_batch_line_attempts=ATTEMPTS,
        flywheel_batch_lease_s=10,
        flywheel_batch_poll_s=0.1,
    )
    flaky = f"toggle-{uuid.uuid4().hex[:8]}"
    routes = worker_routes(upstream.url, flaky)
    worker_id = f"test-worker-{uuid.uuid4().hex[:6]}"
    async with worker_services(settings, routes, worker_id) as services:
        r = Rig(settings, services, engine, upstream, flaky)
        try:
            yield r
        finally:
            upstream.state.failing.discard(flaky)
    async with engine.begin() as conn:
        await conn.execute(delete(Batch).where(Batch.id.in_(r.batches)))
        await conn.execute(delete(StoredFile).where(StoredFile.id.in_(r.files)))
        await conn.execute(delete(ApiKey).where(ApiKey.id.in_(r.keys)))


def custom_ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


# 1. Validation


async def test_validation_fails_the_batch_with_numbered_errors_before_any_call(
    rig: Rig,
) -> None:
    lines = [
        chat_line("a", "ok", rig.text(1)),
        chat_line("b", "no-such-route", rig.text(2)),
        embed_line("c", "emb", rig.text(3)),  # in a chat batch
        {"custom_id": "d", "method": "POST", "url": CHAT, "body": {"model": "ok", "messages": 7}},
        chat_line("a", "ok", rig.text(5)),  # line 1's custom_id again
        chat_line("f", "ok", rig.text(6)),
    ]
    b = await rig.batch(lines)
    assert await rig.run(b.id) == "failed"
    row = await rig.row(b.id)
    assert row.status == "failed"
    assert row.failed_at is not None
    assert row.in_progress_at is None
    assert row.lease_owner is None
    assert row.output_file_id is None
    assert row.error_file_id is None
    errors = batch_object(row)["errors"]["data"]
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "model_not_found", "model"),
        (3, "mismatched_endpoint", "url"),
        (4, "invalid_request", "body.messages"),
        (5, "duplicate_custom_id", "custom_id"),
    ]
    for e in errors:
        assert e["message"].startswith(f"Line {e['line']}: ")
    assert "no-such-route" in errors[0]["message"]
    assert "line 1" in errors[3]["message"]
    assert all(rig.sent(rig.text(i)) == 0 for i in range(1, 7))
    assert not rig.journal(b.id).dir.exists()
    assert (await rig.stats()).counters.get("finished|failed") == 1


async def test_validation_checks_the_owner_keys_routes_and_the_key_itself(rig: Rig) -> None:
    key_id = await rig.key(allowed_routes=["ok"])
    b = await rig.batch(
        [chat_line("a", "ok", rig.text(1)), chat_line("b", "emb", rig.text(2))], owner=key_id
    )
    assert await rig.run(b.id) == "failed"
    errors = batch_object(await rig.row(b.id))["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(2, "route_not_allowed")]

    gone = await rig.batch([chat_line("a", "ok", rig.text(3))], owner="key_" + "0" * 24)
    assert await rig.run(gone.id) == "failed"
    errors = batch_object(await rig.row(gone.id))["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(None, "invalid_api_key")]
    assert rig.sent(rig.text(1)) == rig.sent(rig.text(3)) == 0


# 2. Answered and failed lines


async def test_a_mixed_batch_completes_with_both_files_in_input_order(rig: Rig) -> None:
    routes = ["ok", "bad", "ok", "ok", "bad", "ok", "bad", "ok"]
    lines = [chat_line(f"req-{i}", r, rig.text(i)) for i, r in enumerate(routes)]
    b = await rig.batch(lines)
    assert await rig.run(b.id) == "completed"

    row = await rig.row(b.id)
    view = batch_object(row)
    assert view["status"] == "completed"
    assert view["request_counts"] == {"total": 8, "completed": 5, "failed": 3}
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert view[stamp] is not None
    assert row.lease_owner is None
    assert row.lease_until is None
    assert row.model == "ok"

    out, err = rig.read(row.output_file_id), rig.read(row.error_file_id)
    good = [i for i, r in enumerate(routes) if r == "ok"]
    failed = [i for i, r in enumerate(routes) if r == "bad"]
    assert custom_ids(out) == [f"req-{i}" for i in good]
    assert custom_ids(err) == [f"req-{i}" for i in failed]
    for i, line in zip(good, out, strict=True):
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200
        assert response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == f"Echo: {rig.text(i)}"
    for line in err:
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 400
        error = response["body"]["error"]
        assert error["type"] == "invalid_request_error"
        assert "fake failure 400" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    # 400s are final: one call each, none retried; every line ran exactly once.
    assert all(rig.sent(rig.text(i)) == 1 for i in range(len(routes)))

    usage = view["usage"]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
    assert (usage["input_tokens"], usage["output_tokens"]) == (prompt, completion)
    assert usage["total_tokens"] == prompt + completion

    for file_id, lines_in in ((row.output_file_id, 5), (row.error_file_id, 3)):
        assert file_id is not None
        stored = await get_file(rig.engine, file_id)
        assert stored is not None
        assert (stored.purpose, stored.owner, stored.lines) == ("batch_output", None, lines_in)
        assert stored.bytes == rig.services.storage.path(file_id).stat().st_size
    assert not rig.journal(b.id).dir.exists()  # finalized: the journal is gone

    counters = (await rig.stats()).counters
    assert counters.get(f"lines|{CHAT}|completed") == 5
    assert counters.get(f"lines|{CHAT}|failed") == 3
    assert counters.get("finished|completed") == 1
    assert "retries" not in counters


# 3. Retries


async def test_a_line_failing_then_healthy_is_retried_into_the_output(rig: Rig) -> None:
    state, model = rig.upstream.state, rig.flaky_model
    state.failing.add(model)

    async def heal() -> None:
        while state.count(model) < 2:  # both lines failed once
            await asyncio.sleep(0.01)
        state.failing.discard(model)

    healer = asyncio.create_task(heal())
    lines = [chat_line(f"r{i}", "flaky", rig.text(i)) for i in range(2)]
    b = await rig.batch(lines)
    assert await rig.run(b.id) == "completed"
    await asyncio.wait_for(healer, 1)

    row = await rig.row(b.id)
    assert (row.completed, row.failed) == (2, 0)
    assert row.error_file_id is None
    out = rig.read(row.output_file_id)
    assert custom_ids(out) == ["r0", "r1"]
    assert all(line["response"]["status_code"] == 200 for line in out)
    assert [rig.sent(rig.text(i)) for i in range(2)] == [2, 2]  # failed once, then answered
    assert (await rig.stats()).counters.get("retries", 0) >= 2


async def test_a_line_failing_every_time_uses_up_its_tries(rig: Rig) -> None:
    b = await rig.batch(
        [chat_line("down", "down", rig.text(0)), chat_line("up", "ok", rig.text(1))]
    )
    assert await rig.run(b.id) == "completed"
    row = await rig.row(b.id)
    assert (row.completed, row.failed) == (1, 1)
    [line] = rig.read(row.error_file_id)
    assert line["custom_id"] == "down"
    assert line["response"]["status_code"] == 502  # the upstream's 500, as the gateway says
    assert line["response"]["body"]["error"]["type"] == "upstream_error"
    assert rig.sent(rig.text(0)) == ATTEMPTS
    assert (await rig.stats()).counters.get("retries") == ATTEMPTS - 1


async def test_an_upstreams_429s_use_up_the_lines_tries(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cap-0` answers OpenAI's 429 {"code": "rate_limit_exceeded"} to every request.
    monkeypatch.setattr(batch_line, "RATE_LIMIT_WAITS", 8)  # bounds the cost of a regression
    b = await rig.batch([chat_line("capped", "capped", rig.text(0))])
    assert await rig.run(b.id) == "completed"
    [line] = rig.read((await rig.row(b.id)).error_file_id)
    assert line["response"]["status_code"] == 429
    assert rig.sent(rig.text(0)) == ATTEMPTS  # not 8: upstream 429s are no "limits" wait


# 4. Embeddings


async def test_an_embeddings_batch_runs_end_to_end(rig: Rig) -> None:
    lines = [embed_line(f"e{i}", "emb", rig.text(i)) for i in range(5)]
    b = await rig.batch(lines, endpoint=EMBEDDINGS)
    assert await rig.run(b.id) == "completed"
    row = await rig.row(b.id)
    view = batch_object(row)
    assert view["endpoint"] == EMBEDDINGS
    assert view["model"] == "emb"
    assert view["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert view["usage"]["input_tokens"] == 15
    assert view["usage"]["output_tokens"] == 0
    assert row.error_file_id is None
    out = rig.read(row.output_file_id)
    assert custom_ids(out) == [f"e{i}" for i in range(5)]
    for line in out:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200
        assert body["object"] == "list"
        assert body["data"][0]["object"] == "embedding"
        assert len(body["data"][0]["embedding"]) == 3
    assert all(rig.sent(rig.text(i)) == 1 for i in range(5))
    assert (await rig.stats()).counters.get(f"lines|{EMBEDDINGS}|completed") == 5


# 5. Expiry


async def test_a_batch_past_its_window_expires_with_its_lines_unrun(rig: Rig) -> None:
    lines = [chat_line(f"x{i}", "ok", rig.text(i)) for i in range(4)]
    b = await rig.batch(lines, expires_at=now_utc() - timedelta(minutes=1))
    assert await rig.run(b.id) == "expired"
    row = await rig.row(b.id)
    assert row.expired_at is not None
    assert row.completed_at is None
    assert row.lease_owner is None
    assert row.output_file_id is None
    assert row.completed == 0
    err = rig.read(row.error_file_id)
    assert custom_ids(err) == [f"x{i}" for i in range(4)]
    for line in err:
        assert line["response"] is None
        assert line["error"]["code"] == "batch_expired"
        assert line["error"]["message"]
    assert all(rig.sent(rig.text(i)) == 0 for i in range(4))
    assert (await rig.stats()).counters.get("finished|expired") == 1


async def test_an_expired_batch_keeps_what_was_done(rig: Rig) -> None:
    lines = [chat_line(f"x{i}", "ok", rig.text(i)) for i in range(3)]
    b = await rig.batch(
        lines,
        status="in_progress",
        in_progress_at=now_utc(),
        expires_at=now_utc() - timedelta(seconds=1),
    )
    body = {"object": "chat.completion", "from": "journal", "usage": {"prompt_tokens": 4}}
    journal = rig.journal(b.id, "earlier-worker")
    await asyncio.to_thread(journal.open)
    await asyncio.to_thread(journal.write, [Done(2, True, result_line("x1", "r", 200, body))])
    await asyncio.to_thread(journal.close)
    assert await rig.run(b.id) == "expired"
    row = await rig.row(b.id)
    assert (row.completed, row.failed) == (1, 0)
    assert [line["response"]["body"]["from"] for line in rig.read(row.output_file_id)] == [
        "journal"
    ]
    err = rig.read(row.error_file_id)
    assert custom_ids(err) == ["x0", "x2"]
    assert {line["error"]["code"] for line in err} == {"batch_expired"}
    assert all(rig.sent(rig.text(i)) == 0 for i in range(3))


# 6. Resuming from a journal


async def test_a_batch_resumes_from_its_journal_and_never_reruns_a_finished_line(
    rig: Rig,
) -> None:
    lines = [chat_line(f"c{i}", "ok", rig.text(i)) for i in range(6)]
    b = await rig.batch(lines, status="in_progress", in_progress_at=now_utc())

    def earlier(n: int, ok: bool) -> Done:
        status, body = (200, {"from": "journal", "n": n}) if ok else (400, {"error": {}})
        return Done(n, ok, result_line(f"c{n - 1}", f"req-old-{n}", status, body))

    # A worker died after lines 1 and 3 (3 failed), and while writing line 4; a second
    # one, which lost its lease, wrote line 1 again.
    dead = rig.journal(b.id, "dead-worker")
    torn = earlier(4, True).encode()[:-20]
    await asyncio.to_thread(_write_part, dead, [earlier(1, True), earlier(3, False)], torn)
    await asyncio.to_thread(_write_part, rig.journal(b.id, "lost-worker"), [earlier(1, True)])

    assert await rig.run(b.id) == "completed"
    row = await rig.row(b.id)
    assert (row.total, row.completed, row.failed) == (6, 5, 1)
    assert [rig.sent(rig.text(i)) for i in range(6)] == [0, 1, 0, 1, 1, 1]
    out, err = rig.read(row.output_file_id), rig.read(row.error_file_id)
    assert custom_ids(out) == ["c0", "c1", "c3", "c4", "c5"]
    assert custom_ids(err) == ["c2"]
    assert out[0]["response"]["body"] == {"from": "journal", "n": 1}
    assert out[0]["response"]["request_id"] == "req-old-1"
    assert out[2]["response"]["body"]["object"] == "chat.completion"  # line 4 ran again
    assert not rig.journal(b.id).dir.exists()


def _write_part(journal: Journal, items: list[Done], tail: bytes = b"") -> None:
    journal.open()
    journal.write(items)
    journal.close()
    if tail:
        with journal._part.open("ab") as f:
            f.write(tail)


# 7. Leases


async def test_leases_one_holder_a_lapsed_one_taken_over_and_a_stale_one_powerless(
    rig: Rig,
) -> None:
    b = await rig.batch([chat_line("a", "ok", rig.text(0))])
    engine, lease_s, now = rig.engine, 30.0, now_utc()

    claims = await asyncio.gather(
        *(claim_mine(engine, f"worker-{i}", b.id, lease_s, now) for i in range(6))
    )
    holders = [c for c in claims if c is not None]
    assert len(holders) == 1
    first = holders[0].lease_owner
    assert first is not None
    assert first.startswith("worker-")
    assert (await rig.row(b.id)).lease_owner == first
    # Held: nobody else gets it, however often they ask.
    assert await claim_mine(engine, "late", b.id, lease_s, now + timedelta(seconds=20)) is None
    # The holder renews: still its own.
    assert await checkpoint(engine, b.id, first, lease_s, now, completed=1) == "validating"
    assert await claim_mine(engine, "late", b.id, lease_s, now + timedelta(seconds=29)) is None

    # The lease lapses (the holder paused or died): the next worker takes it over.
    later = now + timedelta(seconds=lease_s + 1)
    taken = await claim_mine(engine, "successor", b.id, lease_s, later)
    assert taken is not None
    assert taken.lease_owner == "successor"
    assert as_utc(taken.lease_until) > later  # type: ignore[arg-type]

    # The old holder finds out and changes nothing.
    assert await checkpoint(engine, b.id, first, lease_s, later, completed=99, failed=9) is None
    assert not await move(engine, b.id, first, "in_progress", later, from_=("validating",))
    assert not await move(engine, b.id, first, "failed", later, from_=("validating",), errors=[])
    await release(engine, b.id, first)
    row = await rig.row(b.id)
    assert (row.status, row.lease_owner, row.completed, row.failed) == (
        "validating",
        "successor",
        1,
        0,
    )
    assert row.in_progress_at is None
    assert row.failed_at is None
    assert row.errors is None

    # The new holder can; a move from a state the batch is not in cannot.
    assert await checkpoint(engine, b.id, "successor", lease_s, later, completed=2) == "validating"
    assert not await move(engine, b.id, "successor", "completed", later, from_=("finalizing",))
    assert await move(engine, b.id, "successor", "in_progress", later, from_=("validating",))
    await release(engine, b.id, "successor")
    row = await rig.row(b.id)
    assert (row.status, row.lease_owner, row.lease_until) == ("in_progress", None, None)
    assert row.in_progress_at is not None
    # Released: free for anyone at once.
    assert await claim_mine(engine, "next", b.id, lease_s, later) is not None


async def test_a_worker_that_lost_its_lease_does_not_finish_the_batch(rig: Rig) -> None:
    b = await rig.batch([chat_line("a", "ok", rig.text(0))])
    claimed = await rig.claim(b.id)
    # Another worker took it over meanwhile (this one's lease lapsed).
    await rig.set_row(b.id, lease_owner="someone-else")
    assert await BatchRun(rig.services, claimed).run() is None
    row = await rig.row(b.id)
    assert (row.status, row.lease_owner) == ("validating", "someone-else")
    assert row.in_progress_at is None
    assert row.failed_at is None


# 8. Live traffic first


async def test_a_line_waits_while_live_requests_queue_for_its_deployment(rig: Rig) -> None:
    key = live_queue_key(rig.prefix, "ok", "fake-gpt-fake")

    async def claim_live(seconds: float) -> None:
        # What `LiveQueuePublisher` writes for a replica whose limiter has waiters.
        secs, micros = await rig.redis.time()
        await rig.redis.zadd(key, {"replica-under-test": secs + micros / 1e6 + seconds})

    # A claim that stays current until it is released.
    await claim_live(60)
    b = await rig.batch([chat_line("a", "ok", rig.text(0)), chat_line("b", "ok", rig.text(1))])
    running = asyncio.create_task(rig.run(b.id))
    await asyncio.sleep(0.8)
    assert not running.done()
    assert rig.sent(rig.text(0)) == rig.sent(rig.text(1)) == 0
    await rig.redis.zrem(key, "replica-under-test")
    assert await asyncio.wait_for(running, 10) == "completed"
    assert rig.sent(rig.text(0)) == rig.sent(rig.text(1)) == 1
    assert rig.services.gate.yields >= 1
    assert rig.services.gate.yield_seconds >= 0.7

    # A claim that lapses by itself (its replica died): the line goes after it.
    yields = rig.services.gate.yields
    started = time.monotonic()
    await claim_live(0.7)
    await asyncio.sleep(rig.services.gate.poll_s * 2)  # the gate's last "clear" is stale
    b = await rig.batch([chat_line("c", "ok", rig.text(2))])
    assert await rig.run(b.id) == "completed"
    assert time.monotonic() - started >= 0.65
    assert rig.services.gate.yields == yields + 1
    assert rig.sent(rig.text(2)) == 1
    assert (await rig.stats()).counters.get("yields", 0) >= 2


async def test_lines_behind_a_yielding_line_wait_too_rather_than_fail(rig: Rig) -> None:
    key = live_queue_key(rig.prefix, "narrow", "fake-gpt-fake")
    secs, micros = await rig.redis.time()
    await rig.redis.zadd(key, {"replica-under-test": secs + micros / 1e6 + 60})
    b = await rig.batch([chat_line(f"n{i}", "narrow", rig.text(i)) for i in range(3)])
    running = asyncio.create_task(rig.run(b.id))
    await asyncio.sleep(3)  # live traffic queues for a while
    assert all(rig.sent(rig.text(i)) == 0 for i in range(3))
    await rig.redis.zrem(key, "replica-under-test")
    assert await asyncio.wait_for(running, 10) == "completed"
    row = await rig.row(b.id)
    assert (row.completed, row.failed) == (3, 0)  # is (1, 2): two 503s in the error file


# 9. The owner key's limits


async def _fill_rpm_window(rig: Rig, key_id: str, requests: int, seconds_ago: int) -> None:
    """Count `requests` made `seconds_ago` against the key's RPM window (the layout of
    `app.ratelimit.redis_window`): they leave the 60 s window `60 - seconds_ago` s later."""
    secs, _ = await rig.redis.time()
    window = f"{rig.prefix}rl:{{{key_id}}}:req"
    await cast(Awaitable[int], rig.redis.hset(window, str(int(secs) - seconds_ago), str(requests)))
    await rig.redis.expire(window, 61)


async def test_a_key_at_its_rpm_holds_lines_back_and_they_all_complete(rig: Rig) -> None:
    key_id = await rig.key(rpm=3)
    await _fill_rpm_window(rig, key_id, 3, seconds_ago=58)  # room again in about 2 s
    lines = [chat_line(f"l{i}", "ok", rig.text(i)) for i in range(3)]
    b = await rig.batch(lines, owner=key_id)
    started = time.monotonic()
    assert await rig.run(b.id) == "completed"
    assert time.monotonic() - started >= 0.8  # they waited for the window
    row = await rig.row(b.id)
    assert (row.completed, row.failed, row.error_file_id) == (3, 0, None)
    assert custom_ids(rig.read(row.output_file_id)) == ["l0", "l1", "l2"]
    assert all(rig.sent(rig.text(i)) == 1 for i in range(3))
    assert (await rig.stats()).counters.get("retries", 0) >= 3  # each waited, none failed
    stored = await get_file(rig.engine, row.output_file_id or "")
    assert stored is not None
    assert stored.owner == key_id


async def test_a_key_whose_budget_is_spent_fails_its_lines_with_insufficient_quota(
    rig: Rig,
) -> None:
    key_id = await rig.key(budget_usd=0.0)
    lines = [chat_line(f"q{i}", "ok", rig.text(i)) for i in range(3)]
    b = await rig.batch(lines, owner=key_id)
    assert await asyncio.wait_for(rig.run(b.id), 5) == "completed"
    row = await rig.row(b.id)
    assert (row.completed, row.failed, row.output_file_id) == (0, 3, None)
    err = rig.read(row.error_file_id)
    assert custom_ids(err) == ["q0", "q1", "q2"]
    for line in err:
        assert line["response"]["status_code"] == 429
        assert line["response"]["body"]["error"]["code"] == "insufficient_quota"
        assert line["response"]["body"]["error"]["type"] == "insufficient_quota"
    assert all(rig.sent(rig.text(i)) == 0 for i in range(3))
    assert "retries" not in (await rig.stats()).counters  # final at once


async def test_a_stopping_worker_leaves_waiting_lines_to_its_successor(rig: Rig) -> None:
    key_id = await rig.key(rpm=1)
    await _fill_rpm_window(rig, key_id, 1, seconds_ago=20)  # no room for 40 s
    lines = [chat_line(f"s{i}", "ok", rig.text(i)) for i in range(2)]
    b = await rig.batch(lines, owner=key_id)
    running = asyncio.create_task(rig.run(b.id))
    deadline = time.monotonic() + 10
    while (await rig.stats()).counters.get("retries", 0) < 2:  # both lines are waiting
        assert time.monotonic() < deadline
        assert not running.done()
        await asyncio.sleep(0.05)
    rig.services.stopping.set()  # the worker is told to stop (a deploy)
    assert await asyncio.wait_for(running, 10) is None  # let go, to be resumed
    row = await rig.row(b.id)
    assert (row.status, row.lease_owner) == ("in_progress", None)
    assert all(rig.sent(rig.text(i)) == 0 for i in range(2))
    # Nothing is final yet: the successor must run both lines.
    assert rig.journal(b.id).load() == {}


# 10. Traces


async def test_a_batch_run_is_a_span_with_a_child_span_per_line(rig: Rig) -> None:
    exporter = InMemorySpanExporter()
    tracing = make_tracing("flywheel-test-worker", None, exporter)
    worker = f"traced-{uuid.uuid4().hex[:6]}"
    lines = [chat_line(f"t{i}", "ok", rig.text(i)) for i in range(3)]
    b = await rig.batch(lines)
    async with worker_services(rig.settings, rig.services.state.routes, worker, tracing) as s:
        claimed = await claim_mine(rig.engine, worker, b.id, 10, now_utc())
        assert claimed is not None
        assert await BatchRun(s, claimed).run() == "completed"
    assert tracing.provider is not None
    assert tracing.provider.force_flush(5000)
    spans = exporter.get_finished_spans()
    [run] = [x for x in spans if x.name == "batch.run"]
    assert run.attributes is not None
    assert run.attributes["flywheel.batch_id"] == b.id
    assert run.context is not None
    line_spans = [x for x in spans if x.name == "batch.line"]
    assert len(line_spans) == 3
    assert {x.parent.span_id for x in line_spans if x.parent} == {run.context.span_id}
    assert sorted(str((x.attributes or {})["flywheel.batch.custom_id"]) for x in line_spans) == [
        "t0",
        "t1",
        "t2",
    ]
    line_ids = {x.context.span_id for x in line_spans if x.context}
    routed = [x for x in spans if x.name == "route" and x.parent]
    assert len(routed) == 3
    assert all(x.parent.span_id in line_ids for x in routed if x.parent)
    tracing.shutdown()
