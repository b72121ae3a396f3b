"""The operator dashboard in a real browser: Debian's chromium, headless, driven by
Playwright, against a real gateway (uvicorn) and arq worker on loopback, with traffic on
mock deployments. It logs in, sees charts with points on the overview, opens a route,
triggers a cycle run and sees it in the runs, gives feedback from a request's detail,
and saves a screenshot of every page. A wrong key opens no page and no data.

Screenshots go to FLYWHEEL_TEST_ARTIFACTS (default `test-artifacts/dashboard/` in the
checkout). Without a chromium on the machine (`make test` installs Debian's where it
can), the test is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import (
    ROOT,
    free_port,
    process_env,
    start_gateway,
    start_worker,
    stop,
    wait_for,
)

pytestmark = pytest.mark.e2e

playwright_api = pytest.importorskip("playwright.async_api")

MASTER = "sk-master-dashboard-e2e-0123456789"
WRONG = "sk-master-dashboard-e2e-0123456780"
CHROMIUM = os.environ.get("FLYWHEEL_CHROMIUM") or shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("FLYWHEEL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
ROUTE = "dash-adaptive"


@dataclass
class Rig:
    url: str
    key: str


def _mock(name: str, latency_ms: int, cost: float) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "mock",
        "model": name,
        "input_cost_per_1k": cost,
        "output_cost_per_1k": cost * 2,
        "mock": {"latency_ms": latency_ms, "jitter_ms": 2, "seed": 3},
    }


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, own_database: str, key_prefix: str
) -> Iterator[Rig]:
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("dashboard")
    routes = {
        "routes": {
            ROUTE: {
                "strategy": "adaptive",
                "deployments": [_mock("dash-fast", 5, 0.0002), _mock("dash-steady", 15, 0.001)],
            },
            "dash-plain": {"deployments": [_mock("dash-plain", 5, 0.0001)]},
        }
    }
    env = process_env(
        tmp,
        routes,
        redis_url,
        # Its own: the overview and the route page must show this traffic, not what
        # other tests' workers aggregated, and its cycle runs must not land in theirs.
        own_database,
        f"{key_prefix}dash{uuid.uuid4().hex[:6]}:",
        FLYWHEEL_MASTER_KEY=MASTER,
        # Points every 10 s, so the overview has some within the test's time.
        FLYWHEEL_METRICS_INTERVAL_S="10",
    )
    port = free_port()
    log = tmp / "processes.log"
    with log.open("wb") as out:
        worker = start_worker(env, out)
        gateway = start_gateway(env, port, out, "--no-access-log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", proc=gateway, timeout_s=30)
        key = _traffic(url)
        _wait_for_history(url)
        yield Rig(url, key)
    finally:
        stop(gateway)
        stop(worker)


def _traffic(url: str) -> str:
    """Mock traffic from a virtual key with limits (the keys page shows their use)."""
    admin = {"authorization": f"Bearer {MASTER}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        made = client.post(
            "/admin/keys", headers=admin, json={"name": "dash-e2e", "rpm": 500, "budget_usd": 5}
        )
        assert made.status_code == 201, made.text
        key: str = made.json()["key"]
        auth = {"authorization": f"Bearer {key}"}
        for i in range(60):
            body = {
                "model": ROUTE if i % 3 else "dash-plain",
                "messages": [{"role": "user", "content": f"question {i % 20}"}],
            }
            sent = client.post("/v1/chat/completions", headers=auth, json=body)
            assert sent.status_code == 200, sent.text
    return key


def _wait_for_history(url: str) -> None:
    """Until the worker's metrics job has written points holding the traffic: all of it
    in the totals, and the route's share (40 of 60) in the route's own series."""
    admin = {"authorization": f"Bearer {MASTER}"}
    deadline = time.monotonic() + 60
    seen: tuple[int, int] = (0, 0)
    while time.monotonic() < deadline:
        got = httpx.get(
            url + "/metrics/history", params={"hours": 1, "route": ROUTE}, headers=admin, timeout=5
        )
        if got.status_code == 200:
            history = got.json()
            seen = (
                sum(p["requests"] for p in history["totals"]),
                sum(p["requests"] for s in history["series"] for p in s["points"]),
            )
            if seen[0] >= 60 and seen[1] >= 40:
                return
        time.sleep(1)
    raise TimeoutError(f"no metrics history with the traffic within 60 s: {seen}")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def _page(browser: Any, errors: list[str]) -> Any:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return page


async def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _status_in_page(page: Any, path: str) -> int:
    """What a script of the dashboard's own origin gets from `path`."""
    status: int = await page.evaluate(
        """async (path) => (await fetch(path, {headers: {"X-Flywheel-Dashboard": "1"}})).status""",
        path,
    )
    return status


async def test_a_wrong_key_opens_no_page_and_no_data(rig: Rig, browser: Any) -> None:
    errors: list[str] = []
    page = await _page(browser, errors)
    await page.goto(rig.url + "/dashboard/")
    assert page.url.endswith("/dashboard/login")
    await page.fill("#key", WRONG)
    await page.click("#login-button")
    await page.wait_for_selector("#login-error:not([hidden])")
    assert "not the master key" in await page.inner_text("#login-error")
    assert page.url.endswith("/dashboard/login")
    await _shot(page, "0-wrong-key")
    assert not await page.context.cookies()
    for path in ("/admin/routes", "/admin/requests", "/admin/keys", "/v1/virtuous-cycle/status"):
        assert await _status_in_page(page, path) == 401, path
    for path in ("/dashboard/js/app.js", "/dashboard/index.html", "/dashboard/js/keys.js"):
        assert (await page.goto(rig.url + path)).status == 401, path
    await page.goto(rig.url + "/dashboard/#/requests")
    assert urlsplit(page.url).path == "/dashboard/login"
    await page.context.close()
    assert not errors


async def test_an_operator_tours_the_dashboard(rig: Rig, browser: Any) -> None:
    errors: list[str] = []
    page = await _page(browser, errors)
    await page.goto(rig.url + "/dashboard/")
    await page.fill("#key", MASTER)
    await page.click("#login-button")
    await page.wait_for_url("**/dashboard/#/overview")

    # Overview: charts with points, drawn (uPlot draws on a canvas).
    for chart in ("requests", "latency", "tokens", "cost"):
        await page.wait_for_selector(f"#chart-{chart} canvas")
        points = int(await page.get_attribute(f"#chart-{chart}", "data-points") or "0")
        assert points > 0, chart
    assert int((await page.inner_text("#stat-requests")).split()[-1].replace(",", "")) >= 60
    await _shot(page, "1-overview")

    # Routes: open one; its deployments and charts.
    await page.click("#nav a[data-page=routes]")
    await page.click(f"tr[data-route={ROUTE}]")
    await page.wait_for_selector("#route-name")
    assert await page.inner_text("#route-name") == ROUTE
    table = await page.inner_text("main")
    assert "dash-fast" in table
    assert "dash-steady" in table
    # Once in four CI runs this chart was still missing after 30 s (cause not found
    # yet); the page redraws itself every 30 s, so allow one redraw, and keep a picture
    # and what the chart and any banner said.
    try:
        await page.wait_for_selector("#chart-route-traffic canvas", timeout=45_000)
    except playwright_api.TimeoutError as e:
        said = await page.locator("#chart-route-traffic, .banner").all_inner_texts()
        raise AssertionError(f"no traffic chart on the route page; it shows {said}") from e
    finally:
        await _shot(page, "2-route")

    # The virtuous cycle: trigger a run and see it appear, finished, in the runs.
    await page.click("#nav a[data-page=cycle]")
    await page.click("#trigger-run")
    # Locators, not page functions: the dashboard's CSP allows no eval, tests included.
    await page.locator("#trigger-note", has_text="cycle-").wait_for()
    note = await page.inner_text("#trigger-note")
    job = next(word.rstrip(";") for word in note.split() if word.startswith("cycle-"))
    row = page.locator(f'tr[data-job="{job}"]')
    await row.locator(".badge.completed").wait_for(timeout=90_000)
    assert (await row.get_attribute("data-run") or "").startswith("run_")
    await _shot(page, "3-cycle")

    # Requests: the newest, a detail, feedback from it.
    await page.click("#nav a[data-page=requests]")
    first = page.locator("tr[data-request]").first
    await first.wait_for()
    request_id = await first.get_attribute("data-request")
    await first.click()
    await page.wait_for_url(f"**/#/requests/{request_id}")
    await page.click("#thumbs-up")
    await page.locator("#feedback-note", has_text="Accepted").wait_for()
    # Recorded by the workers, then shown in the detail's feedback (the page looks again).
    await page.locator("#feedback-list td.num", has_text="1.000").wait_for(timeout=20_000)
    await _shot(page, "4-request")
    await page.click("#nav a[data-page=requests]")
    await page.locator("tr[data-request]").first.wait_for()
    await page.select_option("#filter-route", "dash-plain")
    await page.wait_for_url("**/#/requests?route=dash-plain")
    await page.locator("tr[data-request]").first.wait_for()
    routes_shown = await page.locator("tr[data-request] td:nth-child(3)").all_inner_texts()
    assert routes_shown
    assert set(routes_shown) == {"dash-plain"}

    # Keys and alerts: the key's use against its limits, no secret.
    await page.click("#nav a[data-page=keys]")
    await page.wait_for_selector("tr[data-key]")
    text = await page.inner_text("main")
    assert "dash-e2e" in text
    assert rig.key not in text
    await _shot(page, "5-keys")

    # Logging out closes it all again.
    await page.click("#logout")
    await page.wait_for_url("**/dashboard/login")
    assert await _status_in_page(page, "/admin/routes") == 401
    await page.context.close()
    assert not errors
