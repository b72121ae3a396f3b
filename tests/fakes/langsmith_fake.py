"""A fake LangSmith API on loopback, speaking the wire format of the installed client.

What the langsmith client sends, and what this fake answers:
  GET  /info               server facts; `batch_ingest_config.use_multipart_endpoint` and
                           `instance_flags.zstd_compression_enabled` decide how the client's
                           auto batching sends runs (this fake says yes to both by default)
  POST /runs/multipart     multipart/form-data, one part per piece of a run: `post.<id>`
                           (the run without its big fields), `post.<id>.inputs`, `.outputs`,
                           `.extra`, `.error`, `.events`; `patch.<id>…` likewise; feedback as
                           `feedback.<id>`; the body zstd-compressed (`Content-Encoding: zstd`)
                           when the client compresses. 404 here (`multipart=False`) makes the
                           client fall back to /runs/batch.
  POST /runs/batch         JSON {"post": [run, …], "patch": [run, …]}
  POST /runs, PATCH /runs/<id>   one run at a time (the client's non-batch path)
  POST /feedback           one feedback as JSON
  GET  /sessions?name=…    the project (a list of at most one), for feedback's session_id

Runs are merged per id (post, then its parts, then patches) into `ls.runs`; feedback is
listed in `ls.feedback`; every write body, decompressed, is kept in `ls.bodies` so a test
can search everything the fake received. With `api_key` set, a request without that
`x-api-key` gets 401. `fail_status` answers every write with that status. `hang()` makes
every request wait, connection open and no answer, until `release()` (or until the client
hangs up); `held` counts the requests waiting now.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import zstandard
from aiohttp import web

from tests.fakes.server import FakeServer, FakeState, Seen

TENANT_ID = "00000000-0000-4000-8000-00000000f1f1"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PART_NAME = re.compile(rb'name="([^"]+)"')


@dataclass
class LangSmithState:
    api_key: str | None = None
    multipart: bool = True
    zstd: bool = True
    fail_status: int | None = None
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    projects: dict[str, str] = field(default_factory=dict)  # name -> id
    bodies: list[bytes] = field(default_factory=list)
    writes: list[tuple[str, int]] = field(default_factory=list)  # (path, run ops) per POST
    encodings: list[str] = field(default_factory=list)  # Content-Encoding of each write
    rejected: int = 0
    held: int = 0
    hanging: bool = False
    _released: threading.Event = field(default_factory=threading.Event)

    def hang(self) -> None:
        self._released.clear()
        self.hanging = True

    def release(self) -> None:
        self.hanging = False
        self._released.set()

    def project_id(self, name: str) -> str:
        return self.projects.setdefault(name, str(uuid.uuid5(uuid.NAMESPACE_DNS, name)))

    def merge(self, op: str, run: dict[str, Any]) -> None:
        current = self.runs.setdefault(str(run["id"]), {})
        current.update(run if op == "post" else {k: v for k, v in run.items() if v is not None})
        if run.get("session_name"):
            self.project_id(run["session_name"])


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(part name, part bytes) of a multipart/form-data body."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    parts: list[tuple[str, bytes]] = []
    for chunk in body.split(b"--" + boundary.encode()):
        chunk = chunk.removeprefix(b"\r\n")
        if not chunk or chunk.startswith(b"--"):
            continue
        head, _, data = chunk.partition(b"\r\n\r\n")
        name = _PART_NAME.search(head)
        if name is not None:
            parts.append((name.group(1).decode(), data.removesuffix(b"\r\n")))
    return parts


def ingest_multipart(ls: LangSmithState, parts: list[tuple[str, bytes]]) -> int:
    """Merge the parts into runs and feedback; the number of run operations."""
    ops = 0
    for name, data in parts:
        kind, _, rest = name.partition(".")
        run_id, _, piece = rest.partition(".")
        if kind == "feedback":
            ls.feedback.append(orjson.loads(data))
        elif kind == "attachment":
            ls.runs.setdefault(run_id, {}).setdefault("attachments", {})[piece] = len(data)
        elif kind in ("post", "patch") and not piece:
            ls.merge(kind, orjson.loads(data))
            ops += 1
        elif kind in ("post", "patch"):
            ls.runs.setdefault(run_id, {})[piece] = orjson.loads(data)
    return ops


def info_body(ls: LangSmithState) -> dict[str, Any]:
    """What LangSmith's /info answers (trimmed to the fields the client reads)."""
    return {
        "version": "0.10.110",
        "license_expiration_time": None,
        "batch_ingest_config": {
            "use_multipart_endpoint": ls.multipart,
            "scale_up_qsize_trigger": 1000,
            "scale_up_nthreads_limit": 16,
            "scale_down_nempty_trigger": 4,
            "size_limit": 100,
            "size_limit_bytes": 20_971_520,
        },
        "instance_flags": {
            "zstd_compression_enabled": ls.zstd,
            "search_enabled": True,
            "dataset_examples_multipart_enabled": True,
        },
        "customer_info": None,
    }


def make_app(state: FakeState, ls: LangSmithState) -> web.Application:
    async def body_of(request: web.Request) -> bytes:
        raw = await request.read()
        if request.headers.get("Content-Encoding") == "zstd" or raw.startswith(_ZSTD_MAGIC):
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        if request.method != "GET":
            ls.bodies.append(raw)
            ls.encodings.append(request.headers.get("Content-Encoding", ""))
        return raw

    async def hold(request: web.Request) -> None:
        ls.held += 1
        try:
            while not ls._released.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    return
                await asyncio.sleep(0.01)
        finally:
            ls.held -= 1

    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        state.seen.append(
            Seen(request.method, request.path, dict(request.headers), dict(request.query), None)
        )
        if ls.hanging:
            await hold(request)
        if ls.api_key is not None and request.headers.get("x-api-key") != ls.api_key:
            ls.rejected += 1
            return web.json_response({"detail": "Invalid token"}, status=401)
        if ls.fail_status is not None and request.method != "GET":
            await request.read()
            return web.json_response({"detail": "fake failure"}, status=ls.fail_status)
        response: web.StreamResponse = await handler(request)
        return response

    async def info(request: web.Request) -> web.Response:
        return web.json_response(info_body(ls))

    async def multipart(request: web.Request) -> web.Response:
        if not ls.multipart:
            return web.json_response({"detail": "Not Found"}, status=404)
        raw = await body_of(request)
        ops = ingest_multipart(ls, parse_multipart(raw, request.headers["Content-Type"]))
        ls.writes.append((request.path, ops))
        return web.json_response({}, status=202)

    async def batch(request: web.Request) -> web.Response:
        body = orjson.loads(await body_of(request))
        for op in ("post", "patch"):
            for run in body.get(op) or []:
                ls.merge(op, run)
        ls.writes.append((request.path, sum(len(body.get(op) or []) for op in ("post", "patch"))))
        return web.json_response({}, status=202)

    async def create_run(request: web.Request) -> web.Response:
        ls.merge("post", orjson.loads(await body_of(request)))
        ls.writes.append((request.path, 1))
        return web.json_response({})

    async def update_run(request: web.Request) -> web.Response:
        ls.merge("patch", {**orjson.loads(await body_of(request)), "id": request.match_info["id"]})
        ls.writes.append((request.path, 1))
        return web.json_response({})

    async def feedback(request: web.Request) -> web.Response:
        body = orjson.loads(await body_of(request))
        ls.feedback.append(body)
        return web.json_response(body)

    async def sessions(request: web.Request) -> web.Response:
        name = request.query.get("name")
        if name is None or name not in ls.projects:
            return web.json_response([])
        project = {
            "id": ls.projects[name],
            "name": name,
            "tenant_id": TENANT_ID,
            "reference_dataset_id": None,
            "start_time": "2024-01-01T00:00:00+00:00",
        }
        return web.json_response([project])

    app = web.Application(middlewares=[gate], client_max_size=64 * 1024 * 1024)
    app.router.add_get("/info", info)
    app.router.add_post("/runs/multipart", multipart)
    app.router.add_post("/runs/batch", batch)
    app.router.add_post("/runs", create_run)
    app.router.add_patch("/runs/{id}", update_run)
    app.router.add_post("/feedback", feedback)
    app.router.add_get("/sessions", sessions)
    return app


class LangSmithFake(FakeServer):
    def __init__(self, api_key: str | None = None, *, multipart: bool = True, zstd: bool = True):
        self.ls = LangSmithState(api_key=api_key, multipart=multipart, zstd=zstd)
        self.ls.release()
        super().__init__(lambda state: make_app(state, self.ls))

    async def _start(self) -> None:
        # aiohttp decodes zstd request bodies only with backports.zstd installed; with
        # auto_decompress off the fake decodes them itself, with zstandard (langsmith's).
        self._runner = web.AppRunner(
            self._make_app(self.state), access_log=None, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        self.ls.release()  # a held request would keep the server from shutting down
        super().stop()

    def __enter__(self) -> LangSmithFake:
        self.start()
        return self
