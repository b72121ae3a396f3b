"""The anomaly alerts' acceptance, with real processes: the gateway under uvicorn, an arq
worker, a fake OpenAI upstream and a fake alert webhook on loopback.

A route with two deployments on the fake (`lag` waits `state.lag_ms`, `gpt-fake` does
not) takes baseline traffic; once that has left the (5 s) window, the `lag` deployment
slows down by 400 ms. The worker, evaluating every second, must raise exactly one
alert for that deployment, with its z-score, listed at GET /admin/alerts, and post it
to the webhook exactly once while the cooldown lasts, however many ticks see the spike.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import free_port, process_env, start_gateway, start_worker, stop, wait_for
from tests.fakes.openai_fake import openai_fake
from tests.fakes.server import FakeServer
from tests.fakes.webhook import WebhookFake

pytestmark = pytest.mark.e2e

MASTER = "sk-master-e2e-alerts-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
WINDOW_S = 5.0
MIN_SAMPLES = 8
SPIKE_MS = 400.0


@dataclass
class Rig:
    url: str
    route: str
    upstream: FakeServer
    webhook: WebhookFake

    def subject(self, deployment: str) -> str:
        return f"{self.route}/{deployment}"


def _routes(route: str, upstream: FakeServer) -> dict[str, Any]:
    def deployment(name: str, model: str) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "openai_compatible",
            "model": model,
            "api_base": upstream.url + "/v1",
            "api_key_env": "OPENAI_API_KEY",
        }

    return {
        "routes": {
            route: {
                "strategy": "weighted",
                "retries": 0,
                "cache": {"mode": "off"},  # every request reaches a deployment
                "deployments": [deployment("steady", "gpt-fake"), deployment("spiky", "lag")],
            }
        }
    }


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, database_url: str, key_prefix: str
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("alerts")
    route = f"spk-{uuid.uuid4().hex[:8]}"
    with openai_fake() as upstream, WebhookFake() as webhook:
        port = free_port()
        env = process_env(
            tmp,
            _routes(route, upstream),
            redis_url,
            database_url,
            f"{key_prefix}alerts{uuid.uuid4().hex[:6]}:",
            FLYWHEEL_MASTER_KEY=MASTER,
            FLYWHEEL_ALERT_INTERVAL_S="1",
            FLYWHEEL_ALERT_WINDOW_S=str(WINDOW_S),
            FLYWHEEL_ALERT_BASELINE_S="120",
            FLYWHEEL_ALERT_MIN_SAMPLES=str(MIN_SAMPLES),
            FLYWHEEL_ALERT_COOLDOWN_S="600",
            FLYWHEEL_ALERT_WEBHOOK_URL=webhook.url,
            FLYWHEEL_ALERT_WEBHOOK_RETRIES="2",
            OPENAI_API_KEY="sk-e2e-openai-0123456789",
        )
        with (tmp / "processes.log").open("wb") as log:
            worker = start_worker(env, log)
            gateway = start_gateway(env, port, log, "--no-access-log")
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for(url + "/health", proc=gateway)
                yield Rig(url, route, upstream, webhook)
            finally:
                stop(gateway)
                stop(worker)


async def send_until(rig: Rig, each: int) -> Counter[str]:
    """Requests (8 at a time, each its own) until both deployments served `each`."""
    served: Counter[str] = Counter()
    async with openai.AsyncOpenAI(
        base_url=rig.url + "/v1", api_key=MASTER, max_retries=0, timeout=10
    ) as client:

        async def one() -> None:
            raw = await client.chat.completions.with_raw_response.create(
                model=rig.route, messages=[{"role": "user", "content": uuid.uuid4().hex}]
            )
            raw.parse()
            served[raw.headers["x-flywheel-deployment"]] += 1

        while min(served["steady"], served["spiky"]) < each:
            await asyncio.gather(*(one() for _ in range(8)))
    return served


def alerts(rig: Rig, **params: str) -> list[dict[str, Any]]:
    resp = httpx.get(rig.url + "/admin/alerts", headers=ADMIN, params=params, timeout=10)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def test_a_latency_spike_raises_one_alert_posted_once(rig: Rig) -> None:
    asyncio.run(send_until(rig, 2 * MIN_SAMPLES))
    # The baseline traffic leaves the window; meanwhile nothing is alarming.
    time.sleep(WINDOW_S + 1.5)
    rig.upstream.state.lag_ms = SPIKE_MS
    spiked = asyncio.run(send_until(rig, MIN_SAMPLES + 4))
    assert spiked["spiky"] >= MIN_SAMPLES

    subject = rig.subject("spiky")
    deadline = time.monotonic() + 15
    found: list[dict[str, Any]] = []
    while not found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = alerts(rig, subject=subject)
    assert found, "no alert for the slowed deployment"
    # A few more ticks still see the spike in their window: no second alert, no repost.
    time.sleep(3.5)
    [alert] = alerts(rig, subject=subject)
    assert alert["kind"] == "latency_spike"
    assert alert["severity"] in ("high", "critical")
    assert alert["z_score"] >= 5.0
    assert alert["value"] >= SPIKE_MS
    assert alert["baseline"] < SPIKE_MS / 4
    assert f"z={alert['z_score']:.2f}" in alert["message"]
    assert alert["webhook_status"] == "sent"
    # One alert for the whole route: the other deployment stayed calm.
    mine = [a for a in alerts(rig, limit="500") if a["route"] == rig.route]
    assert [a["id"] for a in mine] == [alert["id"]]
    posted = rig.webhook.hooks.for_subject(subject)
    assert len(posted) == 1
    assert posted[0]["id"] == alert["id"]
    assert posted[0]["z_score"] == alert["z_score"]
