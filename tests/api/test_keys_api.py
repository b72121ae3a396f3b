"""Admin key management through the served gateway: the secret once, only its hash kept,
paging, updates, revocation, the master key required, and a database that is down."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from sqlalchemy import select

from app.config import Settings, normalise_database_url
from app.main import create_app
from app.store.db import make_engine
from app.store.schema import ApiKey
from tests.conftest import Served

MASTER = "sk-master-keys-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}


@pytest.fixture
async def gw(make_settings: Callable[..., Settings]) -> AsyncIterator[Served]:
    async with Served(create_app(make_settings(flywheel_master_key=MASTER))) as served:
        yield served


async def test_create_shows_the_secret_once_and_stores_its_hash(
    gw: Served, database_url: str
) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client:
        spec = {"name": "team-a", "rpm": 20, "tpm": 1000, "budget_usd": 0.01, "metadata": {"t": 1}}
        created = await client.post("/admin/keys", json=spec)
        assert created.status_code == 201, created.text
        body = created.json()
        secret = body["key"]
        assert secret.startswith("fw-")
        assert len(secret) > 40
        assert body["display_prefix"] == secret[:10]
        assert (body["rpm"], body["tpm"], body["budget_period"]) == (20, 1000, "total")
        again = (await client.get(f"/admin/keys/{body['id']}")).json()
        assert "key" not in again
        assert secret not in str(again)
        assert again["active"] is True
    engine = make_engine(normalise_database_url(database_url))
    async with engine.connect() as conn:
        row = (await conn.execute(select(ApiKey).where(ApiKey.id == body["id"]))).mappings().one()
    await engine.dispose()
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(dict(row))


async def test_list_pages_update_and_revoke(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client:
        ids = [
            (await client.post("/admin/keys", json={"name": f"k{i}"})).json()["id"]
            for i in range(5)
        ]
        seen: list[str] = []
        after = None
        while True:
            params = {"limit": 2} | ({"after": after} if after else {})
            page = (await client.get("/admin/keys", params=params)).json()
            seen += [k["id"] for k in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert set(ids) <= set(seen)
        assert len(seen) == len(set(seen))
        updated = await client.patch(
            f"/admin/keys/{ids[0]}", json={"rpm": 5, "allowed_routes": ["demo"]}
        )
        assert (updated.json()["rpm"], updated.json()["allowed_routes"]) == (5, ["demo"])
        assert updated.json()["name"] == "k0"  # untouched fields stay
        revoked = (await client.delete(f"/admin/keys/{ids[0]}")).json()
        assert revoked["active"] is False
        assert revoked["revoked_at"] is not None
        missing = await client.get("/admin/keys/key_" + "0" * 24)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "key_not_found"
        bad = await client.post("/admin/keys", json={"name": "x", "rpm": -1})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"


async def test_keys_need_the_master_key(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        created = await client.post("/admin/keys", json={"name": "x"}, headers=ADMIN)
        virtual = created.json()["key"]
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": f"Bearer {virtual}"},
        ):
            resp = await client.get("/admin/keys", headers=headers)
            assert resp.status_code == 401
            assert resp.json()["error"]["type"] == "authentication_error"


async def test_database_down_is_a_fast_503(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        flywheel_master_key=MASTER, database_url="postgresql://127.0.0.1:1/none"
    )
    async with (
        Served(create_app(settings)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=20) as client,
    ):
        resp = await client.post("/admin/keys", json={"name": "x"})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "database_unavailable"
