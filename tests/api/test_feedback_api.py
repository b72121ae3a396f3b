"""POST /v1/feedback on the served gateway: validated with OpenAI-shaped errors, and
shipped on the request stream (nothing written to the database on the request)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from tests.api.test_records_api import shipped
from tests.conftest import Served, create_key, openai_route, routes_for
from tests.fakes.server import FakeServer

MASTER = "fw-master-key-for-feedback-tests-0123456789"


@pytest.fixture
async def served(make_settings: Callable[..., Settings], openai_upstream: FakeServer) -> Any:
    prefix = f"fwfb{uuid.uuid4().hex[:6]}:"
    settings = make_settings(
        openai_api_key="sk-test-0123456789",
        flywheel_redis_prefix=prefix,
        flywheel_master_key=MASTER,
        flywheel_auth="required",
    )
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
