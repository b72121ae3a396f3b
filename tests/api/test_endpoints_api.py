"""Embeddings, models, health and the OpenAPI document through `create_app`."""

from __future__ import annotations

import httpx

from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served
from tests.fakes.server import FakeServer


async def test_embeddings_upstream_and_mock(gateway: Served, openai_upstream: FakeServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        resp = await client.post("/v1/embeddings", json={"model": "gpt-fake", "input": ["a", "b"]})
        assert resp.status_code == 200, resp.text
        assert [d["index"] for d in resp.json()["data"]] == [0, 1]
        assert openai_upstream.seen[-1].path == "/v1/embeddings"
        assert resp.headers["x-flywheel-route"] == "gpt-fake"
        mock = await client.post(
            "/v1/embeddings", json={"model": "demo", "input": "hi", "dimensions": 8}
        )
        vector = mock.json()["data"][0]["embedding"]
        assert len(vector) == 8
        again = await client.post(
            "/v1/embeddings", json={"model": "demo", "input": "hi", "dimensions": 8}
        )
        assert again.json()["data"][0]["embedding"] == vector  # deterministic
        bad = await client.post("/v1/embeddings", json={"model": "demo", "input": []})
        assert_openai_error(bad, 400, "invalid_request_error")
        unknown = await client.post("/v1/embeddings", json={"model": "zzz", "input": "x"})
        assert assert_openai_error(unknown, 404, "invalid_request_error")["code"] == (
            "model_not_found"
        )


async def test_models(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        listed = (await client.get("/v1/models")).json()
        assert listed["object"] == "list"
        ids = [m["id"] for m in listed["data"]]
        assert "gpt-fake" in ids
        assert "demo" in ids
        one = await client.get("/v1/models/gpt-fake")
        assert one.json()["id"] == "gpt-fake"
        assert one.json()["object"] == "model"
        missing = await client.get("/v1/models/nope")
        assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == (
            "model_not_found"
        )


async def test_health(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        live = await client.get("/health")
        assert live.json() == {"status": "ok"}
        assert live.headers["x-request-id"].startswith("req-")
        detail = (await client.get("/health/detailed")).json()
    assert detail["redis"]["status"] == "ok"
    assert detail["database"]["status"] == "ok"
    # No worker runs in API tests: the gateway is degraded, not down.
    assert detail["workers"]["status"] == "missing"
    assert detail["status"] == "degraded"
    names = {d["deployment"] for d in detail["deployments"]}
    assert "fake-gpt-fake" in names


async def test_openapi_docs(gateway: Served) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        spec = (await client.get("/openapi.json")).json()
        assert "/v1/chat/completions" in spec["paths"]
        assert "ChatCompletionRequest" in spec["components"]["schemas"]
        assert (await client.get("/docs")).status_code == 200
