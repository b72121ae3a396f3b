"""POST /v1/feedback on the served gateway: validated with OpenAI-shaped errors, and
shipped on the request stream (nothing written to the database on the request)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from app.config import Settings
from app.main import create_app
from app.store.rows import insert_rows, rows_of
from tests.api.test_records_api import shipped
from tests.conftest import Served, create_key, openai_route, routes_for
from tests.fakes.server import FakeServer
from tests.integration.test_store_and_worker import record

MASTER = "fw-master-key-for-feedback-tests-0123456789"


def gateway_settings(make_settings: Callable[..., Settings], **over: Any) -> Settings:
    """A gateway that wants a key, with the master key and the fake upstream's key."""
    return make_settings(
        openai_api_key="sk-test-0123456789",
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        **over,
    )


@pytest.fixture
async def served(make_settings: Callable[..., Settings], openai_upstream: FakeServer) -> Any:
    prefix = f"fwfb{uuid.uuid4().hex[:6]}:"
    settings = gateway_settings(make_settings, flywheel_redis_prefix=prefix)
    routes = routes_for(chat=openai_route(openai_upstream.url))
    async with Served(create_app(settings, routes)) as gw:
        yield gw, prefix


async def test_feedback_is_accepted_and_shipped_with_the_callers_tenant(
    served: tuple[Served, str], redis_url: str
) -> None:
    gw, prefix = served
    key = await create_key(gw.url, MASTER)
    auth = {"authorization": f"Bearer {key['key']}"}
    async with httpx.AsyncClient(base_url=gw.url, headers=auth, timeout=10) as client:
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        rid = answer.json()["id"]
        resp = await client.post(
            "/v1/feedback", json={"id": rid, "score": 0.75, "comment": "mail bob@example.com"}
        )
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"object": "feedback", "id": rid, "score": 0.75, "status": "accepted"}
    await gw.state.recorder.flush()
    items = await shipped(redis_url, prefix)
    feedback = [i for i in items if i.get("kind") == "feedback"]
    assert len(feedback) == 1
    assert feedback[0]["request_id"] == rid
    assert feedback[0]["score"] == 0.75
    assert feedback[0]["tenant"] == f"key:{key['id']}"
    assert feedback[0]["comment"] == "mail [EMAIL]"  # masked before it left the process
    # Counted as requests: the chat completion only, not the feedback.
    assert [i["request_id"] for i in items if i.get("kind") != "feedback"] == [rid]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"score": 0.5}, "id"),
        ({"id": "chatcmpl-1", "score": 1.5}, "score"),
        ({"id": "chatcmpl-1", "score": -0.1}, "score"),
        ({"id": "chatcmpl-1", "score": "good"}, "score"),
        ({"id": "", "score": 0.5}, "id"),
        ({"id": "chatcmpl-1", "score": 0.5, "rating": 5}, "rating"),
        ({"id": "chatcmpl-1", "score": 0.5, "comment": "x" * 4001}, "comment"),
    ],
)
async def test_bad_feedback_is_a_400_naming_the_field(
    served: tuple[Served, str], redis_url: str, body: dict[str, Any], param: str
) -> None:
    gw, prefix = served
    auth = {"authorization": f"Bearer {MASTER}"}
    async with httpx.AsyncClient(base_url=gw.url, headers=auth, timeout=10) as client:
        resp = await client.post("/v1/feedback", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    await gw.state.recorder.flush()
    assert await shipped(redis_url, prefix) == []  # nothing kept from a refused call


async def test_feedback_needs_a_key_and_json(served: tuple[Served, str]) -> None:
    gw, _ = served
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        resp = await client.post("/v1/feedback", json={"id": "chatcmpl-1", "score": 1})
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "missing_api_key"
        resp = await client.post(
            "/v1/feedback",
            content=b"{not json",
            headers={"authorization": f"Bearer {MASTER}", "content-type": "application/json"},
        )
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_json"


async def ask(client: httpx.AsyncClient) -> str:
    answer = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200, answer.text
    rid: str = answer.json()["id"]
    return rid


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def give(url: str, secret: str, rid: str, **score: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, headers=bearer(secret), timeout=10) as client:
        return await client.post("/v1/feedback", json={"id": rid, **score})


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_not_found(resp: httpx.Response) -> None:
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["code"] == "request_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "id"


async def test_thumbs_are_scores(served: tuple[Served, str], redis_url: str) -> None:
    gw, prefix = served
    key = await create_key(gw.url, MASTER)
    async with httpx.AsyncClient(base_url=gw.url, headers=bearer(key["key"]), timeout=10) as c:
        up, down = await ask(c), await ask(c)
    resp = await give(gw.url, key["key"], up, thumbs="up")
    assert resp.status_code == 202, resp.text
    assert resp.json()["score"] == 1.0
    resp = await give(gw.url, key["key"], down, thumbs="down", comment="wrong")
    assert resp.status_code == 202, resp.text
    assert resp.json()["score"] == 0.0
    for body in ({}, {"score": 1.0, "thumbs": "up"}, {"thumbs": "sideways"}):
        resp = await give(gw.url, key["key"], up, **body)
        assert resp.status_code == 400, body
        assert resp.json()["error"]["param"] in ("score", "thumbs")
    await gw.state.recorder.flush()
    given = {i["request_id"]: i["score"] for i in await shipped(redis_url, prefix) if i.get("kind")}
    assert given == {up: 1.0, down: 0.0}


async def test_only_the_requests_key_or_the_master_key_may_score_it(
    served: tuple[Served, str], redis_url: str
) -> None:
    gw, prefix = served
    mine, theirs = await create_key(gw.url, MASTER), await create_key(gw.url, MASTER)
    async with httpx.AsyncClient(base_url=gw.url, headers=bearer(mine["key"]), timeout=10) as c:
        rid = await ask(c)
    assert_not_found(await give(gw.url, theirs["key"], rid, score=0.0))  # not "forbidden"
    assert_not_found(await give(gw.url, mine["key"], f"chatcmpl-{uuid.uuid4().hex}", score=1))
    assert_not_found(await give(gw.url, MASTER, f"chatcmpl-{uuid.uuid4().hex}", score=1))
    assert (await give(gw.url, mine["key"], rid, score=0.5)).status_code == 202
    assert (await give(gw.url, MASTER, rid, thumbs="up")).status_code == 202
    await gw.state.recorder.flush()
    given = [(i["tenant"], i["score"]) for i in await shipped(redis_url, prefix) if i.get("kind")]
    assert given == [(f"key:{mine['id']}", 0.5), ("master", 1.0)]  # nothing from `theirs`


async def test_another_gateway_checks_the_owner_in_redis_then_in_the_database(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer, redis_url: str
) -> None:
    prefix = f"fwfb{uuid.uuid4().hex[:6]}:"
    settings = gateway_settings(make_settings, flywheel_redis_prefix=prefix)
    routes = routes_for(chat=openai_route(openai_upstream.url))
    async with (
        Served(create_app(settings, routes)) as first,
        Served(create_app(settings, routes)) as second,
    ):
        mine, theirs = await create_key(first.url, MASTER), await create_key(first.url, MASTER)
        async with httpx.AsyncClient(
            base_url=first.url, headers=bearer(mine["key"]), timeout=10
        ) as c:
            rid = await ask(c)
        await first.state.recorder.flush()  # ships the record and indexes its owner
        assert second.state.recorder.owners.local(rid) is None  # not this gateway's
        assert (await give(second.url, mine["key"], rid, score=0.9)).status_code == 202
        assert_not_found(await give(second.url, theirs["key"], rid, score=0.1))

        # Older than the Redis index: only the database knows it.
        old = f"chatcmpl-{uuid.uuid4().hex}"
        owned = dataclasses.replace(record(old), tenant=f"key:{mine['id']}")
        shipped_record = orjson.loads(orjson.dumps(owned))
        rows, _ = rows_of([shipped_record])
        await insert_rows(second.state.engine, rows)
        assert await second.state.recorder.owners.in_redis(second.state.redis, old) is None
        assert (await give(second.url, mine["key"], old, thumbs="down")).status_code == 202
        assert_not_found(await give(second.url, theirs["key"], old, thumbs="up"))
        assert (await give(second.url, MASTER, old, thumbs="up")).status_code == 202
    items = await shipped(redis_url, prefix)
    given = [(i["request_id"], i["score"]) for i in items if i.get("kind") == "feedback"]
    assert given == [(rid, 0.9), (old, 0.0), (old, 1.0)]


async def test_feedback_is_accepted_when_no_owner_can_be_checked(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    # Redis and the database both unreachable: the worker's own check decides later.
    settings = gateway_settings(
        make_settings,
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        database_url=f"postgresql://127.0.0.1:{closed_port()}/nothing",
    )
    routes = routes_for(chat=openai_route(openai_upstream.url))
    async with Served(create_app(settings, routes)) as gw:
        resp = await give(gw.url, MASTER, f"chatcmpl-{uuid.uuid4().hex}", score=0.4)
        assert resp.status_code == 202, resp.text
        # Kept for when Redis is back (a shipping attempt holds it out of the buffer for
        # the moment it takes to fail, so look more than once).
        for _ in range(50):
            if gw.state.recorder.pending == 1:
                break
            await asyncio.sleep(0.02)
        assert gw.state.recorder.pending == 1


async def test_an_unknown_id_is_accepted_while_the_database_is_down(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> None:
    # Redis answers (the id is not in its index) but the database, which would hold
    # older ids, does not: the request may exist, so the feedback is kept.
    settings = gateway_settings(
        make_settings, database_url=f"postgresql://127.0.0.1:{closed_port()}/nothing"
    )
    routes = routes_for(chat=openai_route(openai_upstream.url))
    async with Served(create_app(settings, routes)) as gw:
        resp = await give(gw.url, MASTER, f"chatcmpl-{uuid.uuid4().hex}", thumbs="up")
        assert resp.status_code == 202, resp.text
