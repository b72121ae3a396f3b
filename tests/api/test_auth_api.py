"""Virtual keys on /v1 through two served replicas sharing Redis and the database:
401/403/503 as OpenAI does, revocation reaching the other replica within a second, and
known keys surviving a database outage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from app.auth.keys import KeyStore
from app.config import Settings
from app.main import create_app
from app.store.db import make_engine
from tests.conftest import Served, create_key, openai_route, routes_for
from tests.fakes.server import FakeServer

MASTER = "sk-master-auth-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}


@pytest.fixture
async def replicas(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer, key_prefix: str
) -> AsyncIterator[tuple[Served, Served]]:
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        openai_api_key="sk-upstream-0123456789",
        flywheel_redis_prefix=f"{key_prefix}auth{uuid.uuid4().hex[:6]}:",
    )
    routes = routes_for(r1=openai_route(openai_upstream.url), r2=openai_route(openai_upstream.url))
    async with Served(create_app(settings, routes)) as a, Served(create_app(settings, routes)) as b:
        yield a, b


async def chat(gw: Served, key: str | None, model: str = "r1") -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        return await client.post("/v1/chat/completions", json=body, headers=headers)


async def new_key(gw: Served, **spec: Any) -> dict[str, Any]:
    return await create_key(gw.url, MASTER, **spec)


def error(resp: httpx.Response) -> tuple[int, str, str]:
    e = resp.json()["error"]
    return resp.status_code, e["type"], e["code"]


async def test_keys_are_required_and_checked(replicas: tuple[Served, Served]) -> None:
    a, b = replicas
    assert error(await chat(a, None)) == (401, "authentication_error", "missing_api_key")
    made_up = "fw-" + uuid.uuid4().hex
    refused = await chat(a, made_up)
    assert error(refused) == (401, "authentication_error", "invalid_api_key")
    assert made_up not in refused.text
    key = await new_key(a, allowed_routes=["r1"])
    assert (await chat(b, key["key"])).status_code == 200  # resolved on the other replica
    assert error(await chat(b, key["key"], "r2")) == (403, "permission_error", "route_not_allowed")
    assert (await chat(a, MASTER, "r2")).status_code == 200  # the master key may use all
    async with httpx.AsyncClient(base_url=b.url, timeout=10) as client:
        auth = {"authorization": f"Bearer {key['key']}"}
        models = (await client.get("/v1/models", headers=auth)).json()
        assert [m["id"] for m in models["data"]] == ["r1"]
        assert (await client.get("/v1/models/r2", headers=auth)).status_code == 403
        assert (await client.get("/v1/models")).status_code == 401


async def test_revocation_reaches_the_other_replica_within_a_second(
    replicas: tuple[Served, Served],
) -> None:
    a, b = replicas
    key = await new_key(a)
    assert (await chat(b, key["key"])).status_code == 200  # B now holds it in memory
    async with httpx.AsyncClient(base_url=a.url, headers=ADMIN, timeout=10) as client:
        assert (await client.delete(f"/admin/keys/{key['id']}")).status_code == 200
    started = time.monotonic()
    while (await chat(b, key["key"])).status_code == 200:
        assert time.monotonic() - started < 1.0, "replica B still serves a revoked key"
        await asyncio.sleep(0.05)
    assert error(await chat(b, key["key"])) == (401, "authentication_error", "invalid_api_key")


async def test_database_down_known_keys_work_unknown_get_503(
    replicas: tuple[Served, Served],
) -> None:
    a, _ = replicas
    key = await new_key(a)
    assert (await chat(a, key["key"])).status_code == 200
    # The database goes away (an unreachable server, not a stand-in): the resolver's
    # store now talks to it, and its in-process entry expires at once.
    dead = make_engine("postgresql+asyncpg://127.0.0.1:1/none")
    resolver = a.state.keys
    resolver.store = KeyStore(dead)
    resolver._cache_s = 0.0
    for secret, want in ((key["key"], 200), ("fw-" + uuid.uuid4().hex, 503)):
        started = time.monotonic()
        resp = await chat(a, secret)
        assert time.monotonic() - started < 1.5
        assert resp.status_code == want, resp.text
    assert error(await chat(a, "fw-" + uuid.uuid4().hex))[2] == "auth_unavailable"
    await dead.dispose()


async def test_auth_follows_the_matched_route_not_the_host_or_a_spelling(
    replicas: tuple[Served, Served],
) -> None:
    a, _ = replicas
    key = await new_key(a)
    body = {"model": "r1", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        # Whatever Host or forwarding headers claim, /v1 needs a key and /admin the master.
        for headers in (
            {"host": "localhost"},
            {"host": "admin.internal", "x-forwarded-host": "localhost"},
            {"x-forwarded-for": "127.0.0.1", "x-real-ip": "127.0.0.1"},
        ):
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 401
            assert (await client.get("/admin/keys", headers=headers)).status_code == 401
        # Other spellings of the paths are other (unknown) routes, never served unchecked.
        for path in ("/v1/chat/completions/", "//v1/chat/completions", "/V1/chat/completions"):
            resp = await client.post(path, json=body)
            assert resp.status_code in (401, 404, 405), (path, resp.status_code)
            assert "choices" not in resp.text
        # A virtual key never opens the admin endpoints.
        virtual = {"authorization": f"Bearer {key['key']}"}
        assert (await client.get("/admin/keys", headers=virtual)).status_code == 401
        assert (await client.get("/admin/jobs/x", headers=virtual)).status_code == 401
