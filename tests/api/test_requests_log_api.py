"""The request log's admin endpoints through `create_app`, on the session's real database:
the master key, keyset paging (ties included), every filter, the bounded scan of a rare
filter, bad parameters, one request in full (bodies, feedback) and a database that is
down.

Rows are inserted directly, each test in a time span of its own (far in the past, where
no other test records anything) and removed after.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.main import create_app
from app.store import request_log
from app.store.schema import Feedback, RequestBody, RequestRow
from tests.api.test_chat_api import assert_openai_error
from tests.conftest import Served, create_key, routes_for

MASTER = "sk-master-request-log-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
LOG = "/admin/requests"
BRIEF_KEYS = {"object", *request_log.BRIEF}
MOCK_ROUTE: dict[str, Any] = {"deployments": [{"name": "m", "provider": "mock", "model": "m"}]}


def new_id() -> str:
    return f"req-{secrets.token_hex(12)}"


def era() -> datetime:
    """The start of a span of time of the test's own, decades back."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=secrets.randbelow(15000))


def row(rid: str, at: datetime, **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": rid,
        "created_at": at,
        "endpoint": "chat.completions",
        "tenant": "key:key_tenant",  # as the gateway records a virtual key's requests
        "key_id": "key_tenant",
        "route": "r-default",
        "deployment": "d-default",
        "provider": "mock",
        "model": "m-default",
        "variant": None,
        "status": 200,
        "error_type": None,
        "error_code": None,
        "stream": False,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "usage_estimated": False,
        "cost": 0.001,
        "cache_tier": "miss",
        "attempts": 1,
        "finish_reason": "stop",
        "client_disconnected": False,
        "trace_id": None,
        "quality_score": None,
        "quality_source": None,
        "quality_reasons": None,
        "extra": None,
    }
    return values | over


def newest_first(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)]


@dataclass
class Rig:
    gw: Served
    client: httpx.AsyncClient
    engine: AsyncEngine
    ids: list[str] = field(default_factory=list)

    async def add(self, rows: list[dict[str, Any]]) -> None:
        self.ids += [r["id"] for r in rows]
        async with self.engine.begin() as conn:
            await conn.execute(insert(RequestRow), rows)

    async def page(self, **params: Any) -> dict[str, Any]:
        resp = await self.client.get(LOG, params=params)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        assert set(body) == {"object", "data", "has_more", "next_cursor", "scanned_to"}
        assert body["object"] == "list"
        return body

    async def pages(self, **params: Any) -> list[dict[str, Any]]:
        """Every page, following `next_cursor` until `has_more` is false."""
        out = [await self.page(**params)]
        while out[-1]["has_more"]:
            assert len(out) < 500, "paging does not end"
            out.append(await self.page(**params, cursor=out[-1]["next_cursor"]))
        assert out[-1]["next_cursor"] is None
        assert out[-1]["scanned_to"] is None
        return out


@pytest.fixture
async def rig(make_settings: Callable[..., Settings], engine: AsyncEngine) -> AsyncIterator[Rig]:
    routes = routes_for(demo=MOCK_ROUTE)
    settings = make_settings(flywheel_master_key=MASTER)
    async with (
        Served(create_app(settings, routes)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client,
    ):
        rig = Rig(gw, client, engine)
        yield rig
    async with engine.begin() as conn:
        await conn.execute(delete(RequestRow).where(RequestRow.id.in_(rig.ids)))
        await conn.execute(delete(RequestBody).where(RequestBody.request_id.in_(rig.ids)))
        await conn.execute(delete(Feedback).where(Feedback.request_id.in_(rig.ids)))


def span(start: datetime, end: datetime) -> dict[str, str]:
    return {"since": start.isoformat(), "until": end.isoformat()}


async def test_the_log_needs_the_master_key(rig: Rig) -> None:
    virtual = (await create_key(rig.gw.url, MASTER, name="not-admin"))["key"]
    async with httpx.AsyncClient(base_url=rig.gw.url, timeout=10) as anon:
        for path in (LOG, f"{LOG}/req-0123", f"{LOG}?status=bogus"):
            for headers in (
                {},
                {"authorization": "Bearer sk-not-the-master-key"},
                {"authorization": f"Bearer {virtual}"},
                {"authorization": MASTER},  # not a bearer token
            ):
                resp = await anon.get(path, headers=headers)
                assert_openai_error(resp, 401, "authentication_error")
        assert (await anon.get(LOG, headers=ADMIN)).status_code == 200


async def test_pages_cover_every_row_once_newest_first_ties_included(rig: Rig) -> None:
    start = era()
    # Groups of seven share a timestamp: the id orders within them.
    rows = [row(new_id(), start + timedelta(seconds=i // 7)) for i in range(120)]
    await rig.add(rows)
    window = span(start, start + timedelta(hours=1))
    pages = await rig.pages(limit=13, **window)
    assert [len(p["data"]) for p in pages] == [13] * 9 + [3]
    assert [r["id"] for p in pages for r in p["data"]] == newest_first(rows)
    for page in pages[:-1]:
        # The next page goes on below the last row shown.
        assert page["scanned_to"] == page["data"][-1]["created_at"]
    first = pages[0]["data"][0]
    assert set(first) == BRIEF_KEYS
    assert first["object"] == "request.record"
    assert datetime.fromisoformat(first["created_at"]) == start + timedelta(seconds=17)
    assert (first["status"], first["cache_tier"], first["stream"]) == (200, "miss", False)
    # One page of all of them, and the default page size.
    whole = await rig.page(limit=200, **window)
    assert [r["id"] for r in whole["data"]] == newest_first(rows)
    assert (whole["has_more"], whole["next_cursor"]) == (False, None)
    default = await rig.page(**window)
    assert len(default["data"]) == 50
    assert default["has_more"] is True


async def test_route_filter_pages_within_the_route(rig: Rig) -> None:
    start, tag = era(), secrets.token_hex(4)
    mine, other = f"log-{tag}", f"log-other-{tag}"
    rows = [
        row(new_id(), start + timedelta(seconds=i // 3), route=mine if i % 4 else other)
        for i in range(40)
    ]
    await rig.add(rows)
    # No time filter: the route alone bounds the listing.
    pages = await rig.pages(limit=7, route=mine)
    expected = newest_first([r for r in rows if r["route"] == mine])
    assert len(expected) == 30
    assert [r["id"] for p in pages for r in p["data"]] == expected


@pytest.mark.parametrize("route", [False, True])
async def test_bounded_pages_with_a_filter_lose_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, route: bool
) -> None:
    monkeypatch.setattr(request_log, "SCAN_ROWS", 7)
    start, tag = era(), secrets.token_hex(4)
    statuses = (200, 500, 200, 429, 201, 503)
    rows = [
        row(
            new_id(),
            start + timedelta(seconds=i // 5),  # boundaries fall inside groups of ties
            status=statuses[i % len(statuses)],
            route=f"bound-{tag}",
        )
        for i in range(60)
    ]
    await rig.add(rows)
    params: dict[str, Any] = {"limit": 4, "status": "ok"}
    params |= {"route": f"bound-{tag}"} if route else span(start, start + timedelta(hours=1))
    pages = await rig.pages(**params)
    expected = newest_first([r for r in rows if r["status"] < 400])
    assert [r["id"] for p in pages for r in p["data"]] == expected
    # Each page looked at no more than 7 rows: 60 rows take at least 9 pages.
    assert len(pages) >= 9
    assert any(len(p["data"]) < 4 and p["has_more"] for p in pages)


async def test_a_rare_filter_scans_a_bounded_window_and_goes_on(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_log, "SCAN_ROWS", 10)
    start = era()
    old = row(new_id(), start, status=504, error_type="upstream_timeout")
    newer = [row(new_id(), start + timedelta(seconds=1 + i)) for i in range(35)]
    await rig.add([old, *newer])
    window = span(start, start + timedelta(hours=1))
    order = newest_first(newer)
    pages = await rig.pages(status="504", **window)
    # 36 rows, 10 a page: three empty pages, each ending at its boundary, then the row.
    assert [len(p["data"]) for p in pages] == [0, 0, 0, 1]
    for n, page in enumerate(pages[:3]):
        boundary = start + timedelta(seconds=35 - 10 * n - 9)
        assert page["has_more"] is True
        assert datetime.fromisoformat(page["scanned_to"]) == boundary
        assert order[10 * n + 9] in base64.urlsafe_b64decode(page["next_cursor"] + "==").decode()
    assert pages[-1]["data"][0]["id"] == old["id"]
    assert pages[-1]["data"][0]["error_type"] == "upstream_timeout"
    # Unfiltered, the page size alone bounds the page: no boundary, the last row's cursor.
    plain = await rig.page(limit=15, **window)
    assert [r["id"] for r in plain["data"]] == order[:15]
    assert datetime.fromisoformat(plain["scanned_to"]) == start + timedelta(seconds=21)


def _mixed(start: datetime, tag: str) -> list[dict[str, Any]]:
    statuses = (200, 201, 404, 429, 500, 503)
    tiers = ("hit-l1", "hit-l2", "miss", "bypass")
    scores = (None, 0.3, 0.6, 0.9, 0.85)
    return [
        row(
            new_id(),
            start + timedelta(minutes=i),
            route=f"a-{tag}" if i % 2 else f"b-{tag}",
            deployment=f"d{i % 3}-{tag}",
            key_id=None if i % 4 == 0 else f"k{i % 4}-{tag}",
            tenant="anonymous" if i % 4 == 0 else f"key:k{i % 4}-{tag}",
            model=f"m{i % 3}-{tag}",
            status=statuses[i % 6],
            cache_tier=tiers[i % 4],
            quality_score=scores[i % 5],
            quality_source=None if scores[i % 5] is None else "rules",
        )
        for i in range(24)
    ]


Case = tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]
FILTERS: dict[str, Case] = {
    "route": ({"route": "a"}, lambda r: r["route"].startswith("a-")),
    "deployment": ({"deployment": "d1"}, lambda r: r["deployment"].startswith("d1-")),
    "key_id": ({"key_id": "k3"}, lambda r: (r["key_id"] or "").startswith("k3-")),
    "model": ({"model": "m2"}, lambda r: r["model"].startswith("m2-")),
    "status_ok": ({"status": "ok"}, lambda r: r["status"] < 400),
    "status_error": ({"status": "error"}, lambda r: r["status"] >= 400),
    "status_2xx": ({"status": "2xx"}, lambda r: 200 <= r["status"] < 300),
    "status_4xx": ({"status": "4xx"}, lambda r: 400 <= r["status"] < 500),
    "status_5xx": ({"status": "5xx"}, lambda r: r["status"] >= 500),
    "status_429": ({"status": "429"}, lambda r: r["status"] == 429),
    "cache_l1": ({"cache": "hit-l1"}, lambda r: r["cache_tier"] == "hit-l1"),
    "cache_l2": ({"cache": "hit-l2"}, lambda r: r["cache_tier"] == "hit-l2"),
    "cache_bypass": ({"cache": "bypass"}, lambda r: r["cache_tier"] == "bypass"),
    "scored": ({"quality": "scored"}, lambda r: r["quality_score"] is not None),
    "unscored": ({"quality": "unscored"}, lambda r: r["quality_score"] is None),
    "low": ({"quality": "low"}, lambda r: (r["quality_score"] or 1) < 0.85),
    "low_below": (
        {"quality": "low", "quality_below": 0.5},
        lambda r: (r["quality_score"] or 1) < 0.5,
    ),
    "below_alone": ({"quality_below": 0.7}, lambda r: (r["quality_score"] or 1) < 0.7),
    "combined": (
        {"route": "a", "status": "5xx", "cache": "hit-l2"},
        lambda r: (
            r["route"].startswith("a-") and r["status"] >= 500 and r["cache_tier"] == "hit-l2"
        ),
    ),
}


@pytest.mark.parametrize("name", list(FILTERS))
async def test_each_filter_lists_exactly_its_rows(rig: Rig, name: str) -> None:
    start, tag = era(), secrets.token_hex(4)
    rows = _mixed(start, tag)
    await rig.add(rows)
    params, keep = FILTERS[name]
    params = {
        k: f"{v}-{tag}" if k in {"route", "deployment", "key_id", "model"} else v
        for k, v in params.items()
    }
    got = await rig.page(limit=200, **params, **span(start, start + timedelta(days=1)))
    expected = newest_first([r for r in rows if keep(r)])
    assert 0 < len(expected) < len(rows)
    assert [r["id"] for r in got["data"]] == expected
    assert got["has_more"] is False


async def test_since_and_until_bound_the_time(rig: Rig) -> None:
    start = era()
    rows = _mixed(start, secrets.token_hex(4))
    await rig.add(rows)
    lo, hi = start + timedelta(minutes=5), start + timedelta(minutes=10)
    got = await rig.page(**span(lo, hi))
    assert [r["id"] for r in got["data"]] == newest_first(rows[5:10])  # since in, until out
    # Naive times are UTC; other offsets are converted.
    naive = {"since": lo.replace(tzinfo=None).isoformat(), "until": hi.isoformat()}
    assert [r["id"] for r in (await rig.page(**naive))["data"]] == newest_first(rows[5:10])
    plus_two = timezone(timedelta(hours=2))
    offset = {"since": lo.astimezone(plus_two).isoformat(), "until": hi.isoformat()}
    assert [r["id"] for r in (await rig.page(**offset))["data"]] == newest_first(rows[5:10])


BAD: list[tuple[dict[str, str], str]] = [
    ({"limit": "0"}, "limit"),
    ({"limit": "201"}, "limit"),
    ({"limit": "many"}, "limit"),
    ({"cursor": "!!!not-base64!!!"}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"hello").decode()}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|bad id!").decode()}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"2024-01-01T00:00:00|req-1").decode()}, "cursor"),
    ({"status": "3xxx"}, "status"),
    ({"status": "600"}, "status"),
    ({"status": "oops"}, "status"),
    ({"cache": "hit"}, "cache"),
    ({"quality": "meh"}, "quality"),
    ({"quality_below": "1.5"}, "quality_below"),
    ({"quality": "scored", "quality_below": "0.5"}, "quality_below"),
    ({"since": "yesterday"}, "since"),
    ({"until": "2024-13-01"}, "until"),
    # Times with no UTC equivalent (found by review: they were 500s).
    ({"since": "0001-01-01T00:00:00+14:00"}, "since"),
    ({"until": "9999-12-31T23:59:59-05:00"}, "until"),
    ({"cursor": base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|req-1").decode()}, "cursor"),
]


async def test_bad_parameters_are_openai_shaped_400s(rig: Rig) -> None:
    for params, param in BAD:
        resp = await rig.client.get(LOG, params=params)
        error = assert_openai_error(resp, 400, "invalid_request_error")
        assert error["param"] == param, (params, error)
    for bad in ("bad%20id!", "x" * 65):
        resp = await rig.client.get(f"{LOG}/{bad}")
        assert assert_openai_error(resp, 400, "invalid_request_error")["param"] == "request_id"


def body(rid: str, expires: datetime, request: str | None, response: str | None) -> dict[str, Any]:
    times = {"created_at": expires - timedelta(days=2), "expires_at": expires}
    return {"request_id": rid, "route": "r", "request": request, "response": response} | times


def feedback(rid: str, tenant: str, score: float, note: str | None, at: datetime) -> dict[str, Any]:
    times = {"created_at": at, "updated_at": at + timedelta(minutes=1)}
    return {"request_id": rid, "tenant": tenant, "score": score, "comment": note} | times


async def test_one_request_in_full_with_its_bodies_and_feedback(rig: Rig) -> None:
    start, now = era(), datetime.now(UTC)
    full = row(new_id(), start, tenant="key:key_abc", key_id="key_abc", variant="var_1")
    full |= {"usage_estimated": True, "client_disconnected": True, "trace_id": "0af7" * 8}
    full |= {"quality_score": 0.4, "quality_source": "feedback", "quality_reasons": ["short"]}
    full |= {"extra": {"batch_id": "batch_1", "region": "eu"}}
    expired, unparsed = row(new_id(), start), row(new_id(), start)
    await rig.add([full, expired, unparsed])
    kept = now + timedelta(days=1)
    async with rig.engine.begin() as conn:
        await conn.execute(
            insert(RequestBody),
            [
                body(full["id"], kept, '{"messages": [{"role": "user"}]}', '{"id": "x"}'),
                body(expired["id"], now - timedelta(seconds=1), '{"gone": true}', None),
                body(unparsed["id"], kept, None, "not json"),
            ],
        )
        await conn.execute(
            insert(Feedback),
            [
                feedback(full["id"], "master", 0.2, None, start + timedelta(minutes=2)),
                feedback(full["id"], "key:key_abc", 0.9, "good", start + timedelta(minutes=1)),
                # A caller without a virtual key: its tenant is a hash of its token.
                feedback(full["id"], "0ad568df" * 4, 0.5, None, start + timedelta(minutes=3)),
            ],
        )
    resp = await rig.client.get(f"{LOG}/{full['id']}")
    assert resp.status_code == 200, resp.text
    got = resp.json()
    # Every column but the tenant, which may be a hash of a caller's token.
    assert set(got) == BRIEF_KEYS | set(full) - {"tenant"} | {"body", "feedback"}
    assert {k: v for k, v in got.items() if k in full and k != "created_at"} == {
        k: v for k, v in full.items() if k not in ("created_at", "tenant")
    }
    assert "0ad568df" not in resp.text
    assert datetime.fromisoformat(got["created_at"]) == start
    assert got["object"] == "request.record"
    assert got["body"]["request"] == {"messages": [{"role": "user"}]}
    assert got["body"]["response"] == {"id": "x"}
    assert datetime.fromisoformat(got["body"]["expires_at"]) == kept
    assert [(f["tenant"], f["score"], f["comment"]) for f in got["feedback"]] == [
        ("key_abc", 0.9, "good"),
        ("master", 0.2, None),
        ("other", 0.5, None),
    ]
    assert datetime.fromisoformat(got["feedback"][1]["updated_at"]) == start + timedelta(minutes=3)
    gone = (await rig.client.get(f"{LOG}/{expired['id']}")).json()
    assert (gone["body"], gone["feedback"]) == (None, [])
    raw = (await rig.client.get(f"{LOG}/{unparsed['id']}")).json()["body"]
    assert (raw["request"], raw["response"]) == (None, "not json")
    missing = await rig.client.get(f"{LOG}/req-{secrets.token_hex(12)}")
    assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == "request_not_found"


async def test_a_database_that_is_down_is_a_503(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        flywheel_master_key=MASTER, database_url="postgresql://127.0.0.1:1/none"
    )
    async with (
        Served(create_app(settings, routes_for(r=MOCK_ROUTE))) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=ADMIN, timeout=10) as client,
    ):
        for path in (LOG, f"{LOG}?status=5xx", f"{LOG}/req-0123"):
            error = assert_openai_error(await client.get(path), 503, "server_error")
            assert error["code"] == "database_unavailable"
