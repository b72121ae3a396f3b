"""The dashboard's gate: master-key login for a signed session cookie, every page and
data endpoint closed to anyone else, the cookie useless without the dashboard's header,
sessions that end (expiry, a new master key), and logins limited per address."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from pydantic import SecretStr

from app.auth.session import COOKIE, HEADER, issue, valid
from app.config import Settings
from app.dashboard import STATIC_DIR
from app.main import create_app
from tests.conftest import Served

MASTER = "sk-master-dashboard-0123456789"
WRONG = "sk-master-dashboard-0123456780"
DASH = {HEADER: "1"}

# Every endpoint the dashboard's scripts read or post to (see app/dashboard/static/js).
DATA = [
    ("GET", "/admin/routes"),
    ("GET", "/admin/routes/demo"),
    ("GET", "/admin/requests"),
    ("GET", "/admin/requests/chatcmpl-0123"),
    ("GET", "/admin/keys?usage=true"),
    ("GET", "/admin/alerts?open=true"),
    ("GET", "/v1/virtuous-cycle/status"),
    ("GET", "/v1/virtuous-cycle/runs"),
    ("GET", "/v1/virtuous-cycle/experiments"),
    ("POST", "/v1/virtuous-cycle/trigger"),
    ("GET", "/metrics/history?hours=1&series=false"),
    ("GET", "/metrics/cache"),
    ("POST", "/v1/feedback"),
]


@pytest.fixture
async def gw(make_settings: Callable[..., Settings]) -> AsyncIterator[Served]:
    settings = make_settings(
        flywheel_master_key=MASTER,
        flywheel_metrics_token="metrics-token-0123456789",
        flywheel_auth="required",
    )
    async with Served(create_app(settings)) as served:
        yield served


async def _login(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/dashboard/login", json={"key": key})


def _pages() -> list[str]:
    names = [p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert "index.html" in names
    assert "js/app.js" in names
    return names


async def test_login_sets_a_strict_http_only_cookie_and_opens_the_pages(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        shut = await client.get("/dashboard/")
        assert shut.status_code == 303
        assert shut.headers["location"] == "/dashboard/login"
        login_page = await client.get("/dashboard/login")
        assert login_page.status_code == 200
        assert "default-src 'self'" in login_page.headers["content-security-policy"]

        done = await _login(client, MASTER)
        assert done.status_code == 204, done.text
        cookie = done.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert MASTER not in cookie

        page = await client.get("/dashboard/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        for name in _pages():
            got = await client.get(f"/dashboard/{name}")
            assert got.status_code == 200, name
        script = await client.get("/dashboard/js/app.js")
        assert script.headers["content-type"].startswith("text/javascript")


async def test_a_wrong_key_opens_no_page_and_no_data(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        refused = await _login(client, WRONG)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert WRONG not in refused.text
        assert "set-cookie" not in refused.headers
        assert not client.cookies

        assert (await client.get("/dashboard/")).status_code == 303
        for name in _pages():
            got = await client.get(f"/dashboard/{name}")
            if name in {"login.html", "login.js", "dashboard.css"}:
                assert got.status_code == 200, name
            else:
                assert got.status_code == 401, name
                assert got.json()["error"]["type"] == "authentication_error"

        wrong = {"authorization": f"Bearer {WRONG}", **DASH}
        for method, path in DATA:
            got = await client.request(method, path, headers=wrong, json={})
            assert got.status_code == 401, (method, path, got.text)
            assert set(got.json()["error"]) == {"message", "type", "param", "code"}


async def test_the_cookie_needs_the_dashboard_header(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        assert (await _login(client, MASTER)).status_code == 204
        # A cross-site form or <img> would send the cookie (were it not SameSite) but
        # could not add a custom header: without it the cookie opens nothing.
        for method, path in DATA:
            got = await client.request(method, path, json={})
            assert got.status_code == 401, (method, path, got.text)
        routes = await client.get("/admin/routes", headers=DASH)
        assert routes.status_code == 200, routes.text
        history = await client.get("/metrics/history?hours=1&series=false", headers=DASH)
        assert history.status_code in (200, 503), history.text
        # The session is the master key's: feedback about an unknown answer is its 404.
        feedback = await client.post(
            "/v1/feedback", headers=DASH, json={"id": "chatcmpl-none", "thumbs": "up"}
        )
        assert feedback.status_code in (404, 503), feedback.text


async def test_forged_expired_and_old_master_sessions_are_refused(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(flywheel_master_key=MASTER)
    async with (
        Served(create_app(settings)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        now = time.time()
        good = issue(SecretStr(MASTER), now, 600)
        cases = {
            "expired": issue(SecretStr(MASTER), now - 700, 600),
            "old master": issue(SecretStr(WRONG), now, 600),
            "tampered": re.sub(r"^v1\.(\d+)", lambda m: f"v1.{int(m[1]) + 9999}", good),
            "garbage": "v1.nonsense",
        }
        for what, token in cases.items():
            client.cookies.set(COOKIE, token)
            assert (await client.get("/dashboard/")).status_code == 303, what
            assert (await client.get("/admin/routes", headers=DASH)).status_code == 401, what
        client.cookies.set(COOKIE, good)
        assert (await client.get("/admin/routes", headers=DASH)).status_code == 200


def test_tokens_expire_and_are_bound_to_the_master_key() -> None:
    master = SecretStr(MASTER)
    token = issue(master, 1_000_000.0, 60)
    assert valid(token, master, 1_000_059.0)
    assert not valid(token, master, 1_000_060.0)
    assert not valid(token, SecretStr(WRONG), 1_000_000.0)
    assert not valid(token, None, 1_000_000.0)
    assert not valid(token[:-2] + "AA", master, 1_000_000.0)
    assert MASTER not in token


async def test_logins_are_limited_per_address(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        answers = [(await _login(client, WRONG)).status_code for _ in range(11)]
        assert answers[:10] == [401] * 10
        assert answers[10] == 429
        # Even the right key waits out the window: guessing is not sped up by luck.
        assert (await _login(client, MASTER)).status_code == 429


async def test_logout_and_unknown_or_escaping_paths(gw: Served) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        assert (await _login(client, MASTER)).status_code == 204
        assert (await client.get("/dashboard/..%2Fconfig.py")).status_code == 404
        assert (await client.get("/dashboard/js/../../config.py")).status_code in (401, 404)
        assert (await client.get("/dashboard/nothing.js")).status_code == 404
        out = await client.post("/dashboard/logout")
        assert out.status_code == 204
        assert (await client.get("/dashboard/")).status_code == 303


async def test_a_logged_out_session_is_refused_by_every_replica(
    gw: Served, make_settings: Callable[..., Settings]
) -> None:
    """Logout ends the session server-side: its cookie, kept and replayed (a copy an
    attacker took, a second tab), opens nothing on this replica or another, while a
    session logged in separately lives on."""
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        token = (await _login(client, MASTER)).cookies[COOKIE]
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as other:
        kept = (await _login(other, MASTER)).cookies[COOKIE]
    replica = make_settings(
        flywheel_master_key=MASTER,
        flywheel_metrics_token="metrics-token-0123456789",
        flywheel_auth="required",
    )
    cookie = {"cookie": f"{COOKIE}={token}"}
    alive = {"cookie": f"{COOKIE}={kept}"} | DASH

    async def status(served: Served, path: str, headers: dict[str, str]) -> int:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            return (await client.get(path, headers=headers)).status_code

    async with Served(create_app(replica)) as two:
        for served in (gw, two):
            assert await status(served, "/admin/routes", cookie | DASH) == 200
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            out = await client.post("/dashboard/logout", headers=cookie)
        assert out.status_code == 204
        for served in (gw, two):
            for path in ("/admin/routes", "/v1/virtuous-cycle/status", "/metrics/cache"):
                assert await status(served, path, cookie | DASH) == 401, (served.url, path)
            assert await status(served, "/dashboard/", cookie) == 303
            assert await status(served, "/dashboard/js/app.js", cookie) == 401
            assert await status(served, "/admin/routes", alive) == 200


async def test_logout_with_redis_down_still_clears_the_cookie(
    make_settings: Callable[..., Settings],
) -> None:
    """With Redis unreachable the logout cannot be recorded: the browser's cookie is
    cleared all the same, and sessions go on being checked by signature and expiry
    (an outage degrades; it does not lock the operator out)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # bound, never listening: connections are refused
        settings = make_settings(
            flywheel_master_key=MASTER,
            flywheel_auth="required",
            redis_url=f"redis://127.0.0.1:{dead}/0",
        )
        async with (
            Served(create_app(settings)) as served,
            httpx.AsyncClient(base_url=served.url, timeout=10) as client,
        ):
            done = await _login(client, MASTER)
            assert done.status_code == 204
            assert (await client.get("/admin/routes", headers=DASH)).status_code == 200
            out = await client.post("/dashboard/logout")
            assert out.status_code == 204
            assert "max-age=0" in out.headers["set-cookie"].lower()
            assert COOKIE not in client.cookies  # the browser's copy is gone


async def test_no_master_key_means_no_dashboard(make_settings: Callable[..., Settings]) -> None:
    async with (
        Served(create_app(make_settings())) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        refused = await _login(client, "anything")
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "admin_disabled"
        assert (await client.get("/dashboard/")).status_code == 303


async def test_odd_cookies_neither_break_nor_hide_a_session(gw: Served) -> None:
    """Found by review: a non-ASCII digit in a token was a 500 on every endpoint; one
    malformed cookie of another application, or a second cookie of the same name,
    hid a valid session."""
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        done = await _login(client, MASTER)
        token = done.cookies[COOKIE]
    base = httpx.AsyncClient(base_url=gw.url, timeout=10)
    async with base as client:
        for path in ("/admin/routes", "/dashboard/", "/v1/models"):
            got = await client.get(
                path, headers={"cookie": f'{COOKIE}="v1.\u00b2.x.y"'.encode("latin-1"), **DASH}
            )
            assert got.status_code in (303, 401), (path, got.status_code)
        for cookie in (
            f"a=b c; {COOKIE}={token}",
            f'x={{"a":1}}; {COOKIE}={token}',
            f"a=b\\c; {COOKIE}={token}",
            f"{COOKIE}={token}; {COOKIE}=planted-elsewhere",
            f"{COOKIE}=planted-elsewhere; {COOKIE}={token}",
        ):
            got = await client.get("/admin/routes", headers={"cookie": cookie, **DASH})
            assert got.status_code == 200, cookie
        planted = await client.get(
            "/admin/routes", headers={"cookie": f"{COOKIE}=planted-elsewhere", **DASH}
        )
        assert planted.status_code == 401
