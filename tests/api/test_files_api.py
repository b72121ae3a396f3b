"""OpenAI's Files API (`/v1/files`) through `create_app`, with the official SDK where it
speaks it: upload (streamed, size-limited, checked line by line), retrieve, list with
paging, content read back byte for byte, delete; owners and the master key; expiry and
its pruning; a database that does not answer.

Each test has its own files directory, so what is left on disk is its own; the rows it
adds are removed after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import delete, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.files.prune import prune_expired
from app.files.storage import FileStorage
from app.main import create_app
from app.store.schema import Batch, StoredFile
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served, create_key, routes_for

MASTER = "sk-master-files-api-0123456789"
ROUTES = routes_for(demo={"deployments": [{"name": "d", "provider": "mock", "model": "d"}]})


def request_line(custom_id: str, content: str = "Hi", **extra: Any) -> bytes:
    item = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "demo", "messages": [{"role": "user", "content": content}]},
        **extra,
    }
    return orjson.dumps(item) + b"\n"


def jsonl(n: int, tag: str = "r") -> bytes:
    return b"".join(request_line(f"{tag}-{i}") for i in range(n))


@dataclass
class Rig:
    gw: Served
    files_dir: Path
    engine: AsyncEngine
    master: str = MASTER
    ids: set[str] = field(default_factory=set)

    def client(self, key: str = MASTER) -> httpx.AsyncClient:
        auth = {"authorization": f"Bearer {key}"}
        return httpx.AsyncClient(base_url=self.gw.url + "/v1", headers=auth, timeout=30)

    def sdk(self, key: str = MASTER) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key=key, max_retries=0)

    async def key(self) -> tuple[str, str]:
        made = await create_key(self.gw.url, MASTER)
        return str(made["key"]), str(made["id"])

    async def upload(
        self, data: bytes, key: str = MASTER, *, name: str = "input.jsonl", **form: str
    ) -> httpx.Response:
        async with self.client(key) as client:
            resp = await client.post(
                "/files", files={"file": (name, data)}, data={"purpose": "batch", **form}
            )
        if resp.status_code == 200:
            self.ids.add(resp.json()["id"])
        return resp

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in self.files_dir.iterdir()) if self.files_dir.exists() else []


@asynccontextmanager
async def serve(settings: Settings, engine: AsyncEngine) -> AsyncIterator[Rig]:
    async with Served(create_app(settings, ROUTES)) as gw:
        rig = Rig(gw, settings.files_dir, engine)
        try:
            yield rig
        finally:
            async with engine.begin() as conn:
                await conn.execute(delete(StoredFile).where(StoredFile.id.in_(rig.ids)))


@pytest.fixture
def files_settings(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values = {
            "flywheel_master_key": MASTER,
            "flywheel_auth": "required",
            "flywheel_files_dir": tmp_path / "files",
            **overrides,
        }
        return make_settings(**values)

    return build


@pytest.fixture
async def rig(files_settings: Callable[..., Settings], engine: AsyncEngine) -> AsyncIterator[Rig]:
    async with serve(files_settings(), engine) as rig:
        yield rig


async def test_the_sdk_uploads_retrieves_lists_reads_and_deletes(rig: Rig) -> None:
    key, _ = await rig.key()
    # CRLF endings, non-ASCII text and no final newline: the bytes come back as sent.
    data = request_line("a", "café ☕").rstrip(b"\n") + b"\r\n" + request_line("b").rstrip(b"\n")
    async with rig.sdk(key) as sdk:
        made = await sdk.files.create(file=("in.jsonl", data), purpose="batch")
        rig.ids.add(made.id)
        assert made.id.startswith("file-")
        assert len(made.id) == 29
        assert (made.object, made.purpose, made.filename) == ("file", "batch", "in.jsonl")
        assert (made.bytes, made.status, made.status_details) == (len(data), "processed", None)
        assert made.expires_at is not None
        assert made.expires_at - made.created_at == 30 * 24 * 3600  # the configured default

        got = await sdk.files.retrieve(made.id)
        assert got.model_dump() == made.model_dump()
        content = await sdk.files.content(made.id)
        assert content.read() == data
        assert content.text == data.decode()
        assert [f.id for f in (await sdk.files.list()).data] == [made.id]

        gone = await sdk.files.delete(made.id)
        assert (gone.id, gone.deleted, gone.object) == (made.id, True, "file")
        with pytest.raises(openai.NotFoundError):
            await sdk.files.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await sdk.files.delete(made.id)
        assert (await sdk.files.list()).data == []
    assert rig.on_disk() == []
    async with rig.client() as client:
        raw = (await client.get("/files", params={"purpose": "batch", "limit": 1})).json()
    assert set(raw) == {"object", "data", "first_id", "last_id", "has_more"}


async def test_expires_after_as_the_sdk_sends_it(rig: Rig) -> None:
    async with rig.sdk() as sdk:
        made = await sdk.files.create(
            file=("x.jsonl", jsonl(1)),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
        rig.ids.add(made.id)
        assert made.expires_at == made.created_at + 3600
        for seconds in (60, 2592001):
            with pytest.raises(openai.BadRequestError) as caught:
                await sdk.files.create(
                    file=("x.jsonl", jsonl(1)),
                    purpose="batch",
                    expires_after={"anchor": "created_at", "seconds": seconds},
                )
            assert caught.value.param == "expires_after.seconds"
    resp = await rig.upload(jsonl(1), **{"expires_after[seconds]": "7200"})
    assert (
        assert_openai_error(resp, 400, "invalid_request_error")["param"] == "expires_after.anchor"
    )
    assert rig.on_disk() == [made.id]


async def test_paging_with_after_and_limit(rig: Rig) -> None:
    key, _ = await rig.key()
    made = []
    for i in range(5):
        resp = await rig.upload(jsonl(1, f"p{i}"), key, name=f"f{i}.jsonl")
        assert resp.status_code == 200, resp.text
        made.append(resp.json()["id"])
    async with rig.sdk(key) as sdk:
        page = await sdk.files.list(limit=2)
        assert [f.id for f in page.data] == made[::-1][:2]
        assert page.has_more
        assert [f.id async for f in sdk.files.list(limit=2)] == made[::-1]
        assert [f.id async for f in sdk.files.list(limit=2, order="asc")] == made
        after = await sdk.files.list(limit=10, order="asc", after=made[1])
        assert [f.id for f in after.data] == made[2:]
        assert not after.has_more
        assert (await sdk.files.list(purpose="batch_output")).data == []
    async with rig.client(key) as client:
        body = (await client.get("/files", params={"limit": 2, "after": made[3]})).json()
        assert body["data"][0]["id"] == made[2]
        assert (body["first_id"], body["last_id"], body["has_more"]) == (made[2], made[1], True)
        for bad in ({"limit": 0}, {"limit": 10_001}, {"order": "sideways"}):
            resp = await client.get("/files", params=bad)
            assert_openai_error(resp, 400, "invalid_request_error")


async def test_a_bad_line_is_refused_naming_it_and_nothing_is_kept(rig: Rig) -> None:
    async with rig.sdk() as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.files.create(file=("x.jsonl", jsonl(2) + b"{oops\n"), purpose="batch")
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"].startswith("Line 3: not valid JSON")
    assert (caught.value.code, caught.value.param) == ("invalid_json", "file")

    duplicate = request_line("a") + request_line("b") + request_line("a")
    error = assert_openai_error(await rig.upload(duplicate), 400, "invalid_request_error")
    assert error["code"] == "duplicate_custom_id"
    assert error["message"].startswith("Line 3: ")
    assert "line 1" in error["message"]

    streaming = request_line("a", body={"model": "demo", "messages": [], "stream": True})
    error = assert_openai_error(await rig.upload(streaming), 400, "invalid_request_error")
    assert error["message"].startswith("Line 1: ")
    assert "stream" in error["message"]
    error = assert_openai_error(await rig.upload(b""), 400, "invalid_request_error")
    assert error["code"] == "empty_file"
    assert rig.on_disk() == []
    async with rig.client() as client:
        assert not rig.ids & {f["id"] for f in (await client.get("/files")).json()["data"]}


async def test_too_many_requests_in_one_file(
    files_settings: Callable[..., Settings], engine: AsyncEngine
) -> None:
    async with serve(files_settings(flywheel_batch_max_requests=3), engine) as rig:
        assert (await rig.upload(jsonl(3))).status_code == 200
        error = assert_openai_error(await rig.upload(jsonl(4)), 400, "invalid_request_error")
        assert (error["code"], error["message"][:8]) == ("too_many_requests", "Line 4: ")
        assert rig.on_disk() == sorted(rig.ids)


async def test_only_batch_files_and_a_proper_form(rig: Rig) -> None:
    error = assert_openai_error(
        await rig.upload(jsonl(1), purpose="fine-tune"), 400, "invalid_request_error"
    )
    assert error["param"] == "purpose"
    async with rig.client() as client:
        resp = await client.post("/files", files={"file": ("x.jsonl", jsonl(1))})
        assert assert_openai_error(resp, 400, "invalid_request_error")["param"] == "purpose"
        resp = await client.post("/files", data={"purpose": "batch"}, files={"other": ("x", b"")})
        assert_openai_error(resp, 400, "invalid_request_error")
        resp = await client.post("/files", data={"purpose": "batch"})
        assert_openai_error(resp, 400, "invalid_request_error")
        resp = await client.post("/files", json={"purpose": "batch"})
        assert_openai_error(resp, 400, "invalid_request_error")
        cut = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\nabc'
        resp = await client.post(
            "/files", content=cut, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert_openai_error(resp, 400, "invalid_request_error")
        assert_openai_error(await client.get("/files/file-abc"), 404, "invalid_request_error")
    async with httpx.AsyncClient(base_url=rig.gw.url) as anonymous:
        resp = await anonymous.post("/v1/files", files={"file": ("x", jsonl(1))})
        assert_openai_error(resp, 401, "authentication_error")
    assert rig.on_disk() == []


async def test_over_the_size_limit_is_a_413_while_streaming(
    files_settings: Callable[..., Settings], engine: AsyncEngine
) -> None:
    async with serve(files_settings(flywheel_files_max_bytes=2000), engine) as rig:
        fits = jsonl(8)
        assert len(fits) <= 2000
        assert (await rig.upload(fits)).status_code == 200
        # Declared too large: refused before the body is read.
        error = assert_openai_error(await rig.upload(jsonl(1000)), 413, "invalid_request_error")
        assert (error["code"], error["param"]) == ("file_too_large", "file")
        # Within the declared slack for the form, but the file part is over.
        error = assert_openai_error(await rig.upload(jsonl(20)), 413, "invalid_request_error")
        assert error["code"] == "file_too_large"

        # No declared length (chunked): counted as it streams.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
            for _ in range(200):
                yield jsonl(10)
            yield b"\r\n--b--\r\n"

        async with rig.client() as client:
            resp = await client.post(
                "/files",
                content=chunks(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
        assert "content-length" not in resp.request.headers
        assert assert_openai_error(resp, 413, "invalid_request_error")["code"] == "file_too_large"
        assert rig.on_disk() == sorted(rig.ids)  # no temporary file left behind


async def test_a_large_upload_streams_through(rig: Rig) -> None:
    data = jsonl(30_000, "big")  # ~4 MB: several parser feeds, several read chunks
    resp = await rig.upload(data)
    assert resp.status_code == 200, resp.text
    file_id = resp.json()["id"]
    async with rig.client() as client:
        got = await client.get(f"/files/{file_id}/content")
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-length"] == str(len(data))
    assert 'filename="input.jsonl"' in got.headers["content-disposition"]
    assert got.content == data


async def test_files_belong_to_their_key_and_the_master_sees_all(rig: Rig) -> None:
    alice, _ = await rig.key()
    bob, _ = await rig.key()
    resp = await rig.upload(jsonl(1), alice)
    file_id = resp.json()["id"]
    async with rig.client(bob) as client:
        for path in (f"/files/{file_id}", f"/files/{file_id}/content"):
            error = assert_openai_error(await client.get(path), 404, "invalid_request_error")
            assert error["code"] == "file_not_found"
        assert_openai_error(await client.delete(f"/files/{file_id}"), 404, "invalid_request_error")
        assert (await client.get("/files")).json()["data"] == []
    mine = (await rig.upload(jsonl(1))).json()["id"]
    async with rig.client(alice) as client:
        assert [f["id"] for f in (await client.get("/files")).json()["data"]] == [file_id]
        assert (await client.get(f"/files/{mine}")).status_code == 404
    async with rig.client() as client:
        seen = {f["id"] for f in (await client.get("/files")).json()["data"]}
        assert {file_id, mine} <= seen
        assert (await client.get(f"/files/{file_id}/content")).content == jsonl(1)
        assert (await client.delete(f"/files/{file_id}")).json()["deleted"] is True
    assert rig.on_disk() == [mine]


async def test_unknown_ids_are_404(rig: Rig) -> None:
    async with rig.client() as client:
        for file_id in ("file-" + "0" * 24, "file-nope", "..", "x" * 64):
            for resp in (
                await client.get(f"/files/{file_id}"),
                await client.get(f"/files/{file_id}/content"),
                await client.delete(f"/files/{file_id}"),
            ):
                assert_openai_error(resp, 404, "invalid_request_error")


async def test_a_running_batch_keeps_its_input_file(rig: Rig) -> None:
    file_id = (await rig.upload(jsonl(2))).json()["id"]
    batch_id = "batch_" + file_id[5:]
    now = datetime.now(UTC)
    async with rig.engine.begin() as conn:
        await conn.execute(
            insert(Batch).values(
                id=batch_id,
                owner=None,
                endpoint="/v1/chat/completions",
                input_file_id=file_id,
                completion_window="24h",
                status="in_progress",
                created_at=now,
                expires_at=now + timedelta(hours=24),
                total=2,
                completed=0,
                failed=0,
            )
        )
    try:
        async with rig.client() as client:
            error = assert_openai_error(
                await client.delete(f"/files/{file_id}"), 409, "invalid_request_error"
            )
            assert error["code"] == "file_in_use"
            assert (await client.get(f"/files/{file_id}")).status_code == 200
            async with rig.engine.begin() as conn:
                await conn.execute(
                    update(Batch).where(Batch.id == batch_id).values(status="completed")
                )
            assert (await client.delete(f"/files/{file_id}")).status_code == 200
    finally:
        async with rig.engine.begin() as conn:
            await conn.execute(delete(Batch).where(Batch.id == batch_id))
    assert rig.on_disk() == []


async def test_expired_files_are_gone_and_pruned(rig: Rig) -> None:
    old = (await rig.upload(jsonl(1))).json()["id"]
    fresh = (await rig.upload(jsonl(1))).json()["id"]
    past = datetime.now(UTC) - timedelta(seconds=5)
    async with rig.engine.begin() as conn:
        await conn.execute(update(StoredFile).where(StoredFile.id == old).values(expires_at=past))
    (rig.files_dir / ".tmp-leftover").write_bytes(b"half")
    async with rig.client() as client:
        assert (await client.get(f"/files/{old}")).status_code == 404
        assert (await client.get(f"/files/{old}/content")).status_code == 404
        listed = {f["id"] for f in (await client.get("/files")).json()["data"]}
        assert fresh in listed
        assert old not in listed
    storage = FileStorage(rig.files_dir)
    assert await prune_expired(rig.engine, storage, datetime.now(UTC)) >= 1
    assert rig.on_disk() == [".tmp-leftover", fresh]  # a young temporary file stays
    assert storage.sweep_temps(older_than_s=-1) == 1
    assert rig.on_disk() == [fresh]


async def test_a_database_outage_is_a_503_and_leaves_nothing(
    files_settings: Callable[..., Settings], engine: AsyncEngine
) -> None:
    down = files_settings(database_url="postgresql://127.0.0.1:9/nowhere")
    async with serve(down, engine) as rig:
        error = assert_openai_error(await rig.upload(jsonl(2)), 503, "server_error")
        assert error["code"] == "database_unavailable"
        async with rig.client() as client:
            assert_openai_error(await client.get("/files"), 503, "server_error")
            resp = await client.get("/files/file-" + "0" * 24)
            assert_openai_error(resp, 503, "server_error")
        assert rig.on_disk() == []


def test_storage_paths_never_leave_the_directory(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    for bad in ("../etc/passwd", "file-../../x", "/abs", "file-" + "0" * 23 + "/", ""):
        with pytest.raises(ValueError, match="not a file id"):
            storage.path(bad)
    file_id = "file-" + "a" * 24
    assert storage.path(file_id) == tmp_path / file_id
    assert storage.write(file_id, [b"ab", b"c"]) == 3
    with storage.open(file_id) as fh:
        assert fh.read() == b"abc"
    assert storage.delete(file_id)
    assert not storage.delete(file_id)
    with storage.temp() as temp:
        temp.write(b"abandoned")
    assert list(tmp_path.iterdir()) == []
