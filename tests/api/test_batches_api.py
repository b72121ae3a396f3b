"""/v1/batches through `create_app` with the official `openai` SDK: create, retrieve,
list (paged), cancel; validation; owner isolation; and rows a worker filled in parsed
by the SDK. Input files are `files` rows inserted directly (the Files API is elsewhere);
every row a test adds is removed after."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
import openai
import pytest
from openai.types import Batch as SdkBatch
from sqlalchemy import delete, insert, or_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.main import create_app
from app.store.batches import batch_object, cancel_batch, create_batch, get_batch, new_batch_id
from app.store.schema import Batch, StoredFile
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served, create_key

MASTER = "sk-master-batches-0123456789"
CHAT: Final = "/v1/chat/completions"
MAX_REQUESTS = 1000


@dataclass
class Rig:
    gw: Served
    engine: AsyncEngine
    files: list[str] = field(default_factory=list)
    owners: list[str | None] = field(default_factory=list)

    async def key(self) -> tuple[str, str]:
        """A new virtual key: (its id, its secret)."""
        made = await create_key(self.gw.url, MASTER)
        self.owners.append(made["id"])
        return made["id"], made["key"]

    async def file(
        self,
        owner: str | None,
        *,
        lines: int = 3,
        purpose: str = "batch",
        status: str = "processed",
        expires_in: timedelta | None = timedelta(days=30),
    ) -> str:
        file_id = "file-" + uuid.uuid4().hex[:24]
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(StoredFile).values(
                    id=file_id,
                    owner=owner,
                    purpose=purpose,
                    filename="requests.jsonl",
                    bytes=100 * lines,
                    lines=lines,
                    status=status,
                    created_at=now,
                    expires_at=None if expires_in is None else now + expires_in,
                )
            )
        self.files.append(file_id)
        return file_id

    def sdk(self, secret: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key=secret, max_retries=0)

    def http(self, secret: str | None) -> httpx.AsyncClient:
        headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
        return httpx.AsyncClient(base_url=self.gw.url, headers=headers, timeout=10)

    async def set_row(self, batch_id: str, **values: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(Batch).where(Batch.id == batch_id).values(**values))


@pytest.fixture
async def rig(make_settings: Callable[..., Settings], engine: AsyncEngine) -> AsyncIterator[Rig]:
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        flywheel_batch_max_requests=MAX_REQUESTS,
    )
    async with Served(create_app(settings)) as gw:
        r = Rig(gw, engine)
        yield r
    async with engine.begin() as conn:
        # The master key's batches (owner None) are found by their input files.
        await conn.execute(
            delete(Batch).where(
                or_(Batch.owner.in_([o for o in r.owners if o]), Batch.input_file_id.in_(r.files))
            )
        )
        await conn.execute(delete(StoredFile).where(StoredFile.id.in_(r.files)))


async def test_sdk_creates_retrieves_lists_and_cancels(rig: Rig) -> None:
    key_id, secret = await rig.key()
    file_id = await rig.file(key_id, lines=7)
    async with rig.sdk(secret) as client:
        created = await client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"project": "eval", "run": "3"},
            output_expires_after={"anchor": "created_at", "seconds": 7200},
        )
        assert created.id.startswith("batch_")
        assert len(created.id) == len("batch_") + 24
        assert created.object == "batch"
        assert created.status == "validating"
        assert created.endpoint == CHAT
        assert created.input_file_id == file_id
        assert created.completion_window == "24h"
        assert created.metadata == {"project": "eval", "run": "3"}
        assert created.request_counts is not None
        assert created.request_counts.model_dump() == {"total": 7, "completed": 0, "failed": 0}
        assert created.expires_at == created.created_at + 24 * 3600
        assert abs(created.created_at - datetime.now(UTC).timestamp()) < 60
        assert created.errors is None
        assert created.output_file_id is None
        assert created.usage is not None
        assert created.usage.total_tokens == 0
        row = await get_batch(rig.engine, created.id)
        assert row is not None
        assert row.owner == key_id
        assert row.output_expires_s == 7200

        assert await client.batches.retrieve(created.id) == created
        listed = await client.batches.list()
        assert [b.id for b in listed.data] == [created.id]
        assert listed.has_more is False

        cancelling = await client.batches.cancel(created.id)
        assert cancelling.status == "cancelling"
        assert cancelling.cancelling_at is not None
        assert cancelling.cancelling_at >= created.created_at
        assert cancelling.cancelled_at is None
        # Asking again changes nothing.
        assert await client.batches.cancel(created.id) == cancelling
        assert await client.batches.retrieve(created.id) == cancelling

        embeddings = await client.batches.create(
            input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
        )
        assert embeddings.endpoint == "/v1/embeddings"
        assert embeddings.metadata is None


async def test_list_pages_newest_first(rig: Rig) -> None:
    _, other_secret = await rig.key()
    key_id, secret = await rig.key()
    file_id = await rig.file(key_id)
    async with rig.sdk(secret) as client, rig.http(secret) as http:
        made = [
            (
                await client.batches.create(
                    input_file_id=file_id, endpoint=CHAT, completion_window="24h"
                )
            ).id
            for _ in range(5)
        ]
        newest = made[::-1]

        page = (await http.get("/v1/batches", params={"limit": 2})).json()
        assert page["object"] == "list"
        assert [b["id"] for b in page["data"]] == newest[:2]
        assert (page["first_id"], page["last_id"], page["has_more"]) == (
            newest[0],
            newest[1],
            True,
        )
        page = (await http.get("/v1/batches", params={"limit": 2, "after": newest[1]})).json()
        assert [b["id"] for b in page["data"]] == newest[2:4]
        assert page["has_more"] is True
        page = (await http.get("/v1/batches", params={"limit": 2, "after": newest[3]})).json()
        assert [b["id"] for b in page["data"]] == newest[4:]
        assert page["has_more"] is False
        page = (await http.get("/v1/batches", params={"limit": 5})).json()
        assert len(page["data"]) == 5
        assert page["has_more"] is False
        page = (await http.get("/v1/batches", params={"after": newest[4]})).json()
        assert page == {
            "object": "list",
            "data": [],
            "first_id": None,
            "last_id": None,
            "has_more": False,
        }
        # An unknown cursor, or another key's batch as one, gives an empty page.
        assert (await http.get("/v1/batches", params={"after": new_batch_id()})).json()[
            "data"
        ] == []

        # The SDK follows the cursor by itself.
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == newest[:2]
        assert first.has_more is True
        assert [b.id async for b in client.batches.list(limit=2)] == newest
        assert [b.id async for b in client.batches.list()] == newest

        for limit in (0, 101, "x"):
            resp = await http.get("/v1/batches", params={"limit": limit})
            assert assert_openai_error(resp, 400, "invalid_request_error")["param"] == "limit"

    async with rig.sdk(other_secret) as other:
        assert (await other.batches.list()).data == []
        page = await other.batches.list(after=newest[1])
        assert page.data == []


def _meta(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


MISSING = object()  # a key left out of the body
BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"input_file_id": MISSING, "endpoint": CHAT, "completion_window": "24h"}, "input_file_id"),
    ({"input_file_id": 12, "endpoint": CHAT, "completion_window": "24h"}, "input_file_id"),
    ({"input_file_id": "", "endpoint": CHAT, "completion_window": "24h"}, "input_file_id"),
    ({"endpoint": "/v1/responses", "completion_window": "24h"}, "endpoint"),
    ({"endpoint": "/v1/chat/completions/", "completion_window": "24h"}, "endpoint"),
    ({"completion_window": "24h"}, "endpoint"),
    ({"endpoint": CHAT, "completion_window": "48h"}, "completion_window"),
    ({"endpoint": CHAT, "completion_window": 24}, "completion_window"),
    ({"endpoint": CHAT}, "completion_window"),
    ({"endpoint": CHAT, "completion_window": "24h", "metadata": _meta(17)}, "metadata"),
    ({"endpoint": CHAT, "completion_window": "24h", "metadata": ["a"]}, "metadata"),
    ({"endpoint": CHAT, "completion_window": "24h", "metadata": {"k": 1}}, "metadata"),
    ({"endpoint": CHAT, "completion_window": "24h", "metadata": {"k" * 65: "v"}}, "metadata"),
    ({"endpoint": CHAT, "completion_window": "24h", "metadata": {"k": "v" * 513}}, "metadata"),
    (
        {
            "endpoint": CHAT,
            "completion_window": "24h",
            "output_expires_after": {"anchor": "created_at", "seconds": 60},
        },
        "output_expires_after",
    ),
    (
        {
            "endpoint": CHAT,
            "completion_window": "24h",
            "output_expires_after": {"anchor": "completed_at", "seconds": 3600},
        },
        "output_expires_after",
    ),
    (
        {
            "endpoint": CHAT,
            "completion_window": "24h",
            "output_expires_after": {"anchor": "created_at", "seconds": "3600"},
        },
        "output_expires_after",
    ),
    ({"endpoint": CHAT, "completion_window": "24h", "priority": "high"}, "priority"),
]


async def test_invalid_bodies_are_openai_400s(rig: Rig) -> None:
    key_id, secret = await rig.key()
    file_id = await rig.file(key_id)
    async with rig.http(secret) as http:
        for body, param in BAD_BODIES:
            sent = {k: v for k, v in {"input_file_id": file_id, **body}.items() if v is not MISSING}
            resp = await http.post("/v1/batches", json=sent)
            error = assert_openai_error(resp, 400, "invalid_request_error")
            assert str(error["param"]).startswith(param), (body, error)
        for raw in (b"{not json", b"[1, 2]", b"", b'"24h"'):
            resp = await http.post(
                "/v1/batches", content=raw, headers={"content-type": "application/json"}
            )
            assert assert_openai_error(resp, 400, "invalid_request_error")["code"] == "invalid_json"
        # The limits themselves are fine.
        ok = {
            "input_file_id": file_id,
            "endpoint": CHAT,
            "completion_window": "24h",
            "metadata": {f"{i:064d}": "v" * 512 for i in range(16)},
            "output_expires_after": {"anchor": "created_at", "seconds": 30 * 24 * 3600},
        }
        resp = await http.post("/v1/batches", json=ok)
        assert resp.status_code == 200, resp.text
        assert resp.json()["metadata"] == ok["metadata"]
        # Nothing else was created.
        assert len((await http.get("/v1/batches")).json()["data"]) == 1


async def test_input_file_must_be_the_callers_usable_batch_file(rig: Rig) -> None:
    key_id, secret = await rig.key()
    other_id, _ = await rig.key()
    cases = [
        ("file-" + uuid.uuid4().hex[:24], 404, "file_not_found"),
        (await rig.file(other_id), 404, "file_not_found"),
        (await rig.file(None), 404, "file_not_found"),  # the master key's
        (await rig.file(key_id, purpose="batch_output"), 400, "invalid_file_purpose"),
        (await rig.file(key_id, expires_in=-timedelta(seconds=1)), 404, "file_not_found"),
        (await rig.file(key_id, status="error"), 400, "file_not_ready"),
        (await rig.file(key_id, lines=0), 400, "empty_file"),
        (await rig.file(key_id, lines=MAX_REQUESTS + 1), 400, "too_many_requests"),
    ]
    async with rig.http(secret) as http:
        for file_id, status, code in cases:
            body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
            resp = await http.post("/v1/batches", json=body)
            error = assert_openai_error(resp, status, "invalid_request_error")
            assert (error["code"], error["param"]) == (code, "input_file_id"), file_id
        # No expiry, and exactly the limit, are fine.
        for file_id in (
            await rig.file(key_id, expires_in=None),
            await rig.file(key_id, lines=MAX_REQUESTS),
        ):
            body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
            resp = await http.post("/v1/batches", json=body)
            assert resp.status_code == 200, resp.text
    async with rig.sdk(secret) as client:
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id=cases[1][0], endpoint=CHAT, completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError):
            await client.batches.create(
                input_file_id=cases[3][0], endpoint=CHAT, completion_window="24h"
            )


async def test_a_batch_is_its_keys_and_the_masters(rig: Rig) -> None:
    a_id, a_secret = await rig.key()
    _, b_secret = await rig.key()
    a_file = await rig.file(a_id)
    async with rig.sdk(a_secret) as a, rig.sdk(b_secret) as b, rig.sdk(MASTER) as master:
        mine = await a.batches.create(input_file_id=a_file, endpoint=CHAT, completion_window="24h")
        # Another key: as if it did not exist, for every verb.
        with pytest.raises(openai.NotFoundError):
            await b.batches.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            await b.batches.cancel(mine.id)
        assert mine.id not in [x.id async for x in b.batches.list()]
        with pytest.raises(openai.NotFoundError):
            await b.batches.create(input_file_id=a_file, endpoint=CHAT, completion_window="24h")

        # The master key sees and manages every batch, and may use any file.
        assert await master.batches.retrieve(mine.id) == mine
        assert mine.id in [x.id async for x in master.batches.list(limit=100)]
        by_master = await master.batches.create(
            input_file_id=a_file, endpoint=CHAT, completion_window="24h"
        )
        row = await get_batch(rig.engine, by_master.id)
        assert row is not None
        assert row.owner is None
        with pytest.raises(openai.NotFoundError):
            await a.batches.retrieve(by_master.id)
        assert [x.id async for x in a.batches.list()] == [mine.id]
        assert (await master.batches.cancel(mine.id)).status == "cancelling"
        assert (await a.batches.retrieve(mine.id)).status == "cancelling"

        for bad in ("batch_nope", "x" * 64, new_batch_id()):
            with pytest.raises(openai.NotFoundError):
                await a.batches.retrieve(bad)

    async with rig.http(a_secret) as http:
        resp = await http.get(f"/v1/batches/{new_batch_id()}")
        assert assert_openai_error(resp, 404, "invalid_request_error")["code"] == "batch_not_found"
    async with rig.http(None) as anonymous:
        for resp in (
            await anonymous.get("/v1/batches"),
            await anonymous.get("/v1/batches", params={"limit": 0}),
            await anonymous.get(f"/v1/batches/{mine.id}"),
            await anonymous.post(f"/v1/batches/{mine.id}/cancel"),
            await anonymous.post("/v1/batches", json={}),
        ):
            assert_openai_error(resp, 401, "authentication_error")


async def test_cancel_by_status(rig: Rig) -> None:
    key_id, secret = await rig.key()
    file_id = await rig.file(key_id)
    async with rig.sdk(secret) as client:

        async def batch(status: str) -> str:
            made = await client.batches.create(
                input_file_id=file_id, endpoint=CHAT, completion_window="24h"
            )
            await rig.set_row(made.id, status=status)
            return made.id

        running = await batch("in_progress")
        assert (await client.batches.cancel(running)).status == "cancelling"

        for status in ("completed", "failed", "expired", "finalizing"):
            batch_id = await batch(status)
            with pytest.raises(openai.ConflictError) as raised:
                await client.batches.cancel(batch_id)
            assert raised.value.status_code == 409
            assert f"Cannot cancel a batch with status '{status}'" in raised.value.message
            assert (await client.batches.retrieve(batch_id)).status == status

        done = await batch("cancelled")
        at = datetime.now(UTC) - timedelta(minutes=1)
        await rig.set_row(done, cancelling_at=at, cancelled_at=at)
        before = await client.batches.retrieve(done)
        assert await client.batches.cancel(done) == before
        assert before.cancelled_at == int(at.timestamp())

        async with rig.http(secret) as http:
            batch_id = await batch("completed")
            resp = await http.post(f"/v1/batches/{batch_id}/cancel")
            error = assert_openai_error(resp, 409, "invalid_request_error")
            assert error["message"] == "Cannot cancel a batch with status 'completed'."


async def test_a_row_a_worker_filled_parses_in_the_sdk(rig: Rig) -> None:
    key_id, secret = await rig.key()
    file_id = await rig.file(key_id, lines=4)
    t0 = datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    s = timedelta(seconds=1)
    async with rig.sdk(secret) as client:
        made = await client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        await rig.set_row(
            made.id,
            status="completed",
            model="gpt-fake",
            created_at=t0,
            expires_at=t0 + timedelta(hours=24),
            in_progress_at=t0 + s,
            finalizing_at=t0 + 60 * s,
            completed_at=t0 + 61 * s,
            output_file_id="file-" + "a" * 24,
            error_file_id="file-" + "b" * 24,
            completed=3,
            failed=1,
            errors=[{"code": "invalid_json", "message": "line is not JSON", "line": 2}],
            usage={
                "input_tokens": 120,
                "input_tokens_details": {"cached_tokens": 20},
                "output_tokens": 30,
                "output_tokens_details": {"reasoning_tokens": 5},
                "total_tokens": 150,
            },
        )
        got = await client.batches.retrieve(made.id)
    start = int(t0.timestamp())
    assert got.status == "completed"
    assert got.model == "gpt-fake"
    assert (got.created_at, got.in_progress_at, got.finalizing_at, got.completed_at) == (
        start,
        start + 1,
        start + 60,
        start + 61,
    )
    assert got.expires_at == start + 24 * 3600
    assert (got.failed_at, got.expired_at, got.cancelling_at, got.cancelled_at) == (None,) * 4
    assert got.output_file_id == "file-" + "a" * 24
    assert got.error_file_id == "file-" + "b" * 24
    assert got.request_counts is not None
    assert got.request_counts.model_dump() == {"total": 4, "completed": 3, "failed": 1}
    assert got.errors is not None
    assert got.errors.object == "list"
    assert got.errors.data is not None
    assert [e.model_dump() for e in got.errors.data] == [
        {"code": "invalid_json", "message": "line is not JSON", "param": None, "line": 2}
    ]
    assert got.usage is not None
    assert got.usage.model_dump() == {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 20},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 5},
        "total_tokens": 150,
    }

    # `batch_object` straight from the row: every key the SDK knows, none it does not.
    row = await get_batch(rig.engine, made.id)
    assert row is not None
    wire = batch_object(row)
    assert set(wire) == set(SdkBatch.model_fields)
    assert SdkBatch.model_validate(wire) == got

    # Flat usage (the details beside the counts) and no total: read all the same.
    await rig.set_row(
        made.id,
        status="failed",
        failed_at=t0 + 2 * s,
        usage={"input_tokens": 7, "output_tokens": 3, "cached_tokens": 2},
        errors=[],
    )
    row = await get_batch(rig.engine, made.id)
    assert row is not None
    parsed = SdkBatch.model_validate(batch_object(row))
    assert parsed.errors is None
    assert parsed.failed_at == start + 2
    assert parsed.usage is not None
    assert parsed.usage.total_tokens == 10
    assert parsed.usage.input_tokens_details.cached_tokens == 2
    assert parsed.usage.output_tokens_details.reasoning_tokens == 0


async def test_keys_optional_anonymous_callers_own_keyless_batches(
    make_settings: Callable[..., Settings], engine: AsyncEngine
) -> None:
    settings = make_settings(flywheel_master_key=MASTER, flywheel_auth="optional")
    async with Served(create_app(settings)) as gw:
        rig = Rig(gw, engine)
        try:
            key_id, secret = await rig.key()
            keyless, keyed = await rig.file(None), await rig.file(key_id)
            body = {"endpoint": CHAT, "completion_window": "24h"}
            async with rig.http(None) as anonymous, rig.http(secret) as http:
                resp = await anonymous.post("/v1/batches", json={"input_file_id": keyless, **body})
                assert resp.status_code == 200, resp.text
                mine = resp.json()["id"]
                assert (await anonymous.get(f"/v1/batches/{mine}")).status_code == 200
                theirs = await http.post("/v1/batches", json={"input_file_id": keyed, **body})
                assert theirs.status_code == 200, theirs.text
                resp = await anonymous.get(f"/v1/batches/{theirs.json()['id']}")
                assert_openai_error(resp, 404, "invalid_request_error")
                resp = await anonymous.post("/v1/batches", json={"input_file_id": keyed, **body})
                assert_openai_error(resp, 404, "invalid_request_error")
                resp = await http.get(f"/v1/batches/{mine}")
                assert_openai_error(resp, 404, "invalid_request_error")
                listed = (await anonymous.get("/v1/batches", params={"limit": 100})).json()
                assert mine in [b["id"] for b in listed["data"]]
                assert theirs.json()["id"] not in [b["id"] for b in listed["data"]]
        finally:
            async with engine.begin() as conn:
                await conn.execute(delete(Batch).where(Batch.input_file_id.in_(rig.files)))
                await conn.execute(delete(StoredFile).where(StoredFile.id.in_(rig.files)))


async def test_database_down_is_a_503(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        flywheel_master_key=MASTER, database_url="postgresql://127.0.0.1:1/none"
    )
    headers = {"authorization": f"Bearer {MASTER}"}
    body = {"input_file_id": "file-" + "0" * 24, "endpoint": CHAT, "completion_window": "24h"}
    async with (
        Served(create_app(settings)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=20) as http,
    ):
        batch_id = new_batch_id()
        for resp in (
            await http.post("/v1/batches", json=body),
            await http.get("/v1/batches"),
            await http.get(f"/v1/batches/{batch_id}"),
            await http.post(f"/v1/batches/{batch_id}/cancel"),
        ):
            error = assert_openai_error(resp, 503, "server_error")
            assert error["code"] == "database_unavailable"


async def test_cancel_and_a_worker_racing_leave_one_winner(engine: AsyncEngine) -> None:
    """A worker finalizing a batch while a cancel arrives: whichever lands first holds,
    the other changes nothing (the worker's move is conditional, as the workers' are)."""
    now = datetime.now(UTC)
    owner = f"key_race_{uuid.uuid4().hex[:8]}"

    async def finalize(batch_id: str) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status == "in_progress")
                .values(status="finalizing", finalizing_at=now)
            )

    try:
        for _ in range(20):
            made = await create_batch(
                engine,
                owner=owner,
                endpoint=CHAT,
                input_file_id="file-race",
                completion_window="24h",
                metadata=None,
                output_expires_s=None,
                total=1,
                now=now,
            )
            async with engine.begin() as conn:
                await conn.execute(
                    update(Batch).where(Batch.id == made.id).values(status="in_progress")
                )
            answered, _ = await asyncio.gather(
                cancel_batch(engine, made.id, now), finalize(made.id)
            )
            row = await get_batch(engine, made.id)
            assert row is not None
            assert answered is not None
            assert answered.status == row.status
            assert row.status in ("cancelling", "finalizing")
            assert (row.cancelling_at is None) == (row.status == "finalizing")
            assert (row.finalizing_at is None) == (row.status == "cancelling")
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(Batch).where(Batch.owner == owner))
