"""The virtuous cycle's acceptance with real processes: two gateways under uvicorn, an
arq worker, the fake OpenAI upstream on loopback, the real Redis and database.

Traffic goes through gateway A with a virtual key, on an `adaptive` route whose two
deployments answer alike; the client scores every answer by its SDK-visible completion
id (thumbs up for one deployment's answers, down for the other's). A trigger queues a
run (a second trigger while one holds the cycle answers with that one); the run is
recorded with the new weights; the status shows them; gateway B, which served none of
the traffic, routes by them.
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
from redis import Redis

from tests.conftest import create_key
from tests.e2e.conftest import free_port, process_env, start_gateway, start_worker, stop, wait_for
from tests.fakes.openai_fake import openai_fake

pytestmark = pytest.mark.e2e

MASTER = "sk-master-e2e-cycle-0123456789"
ADMIN = {"authorization": f"Bearer {MASTER}"}
REQUESTS = 60


@dataclass
class Rig:
    a: str
    b: str
    route: str
    prefix: str
    redis_url: str


def _routes(route: str, base: str) -> dict[str, Any]:
    def deployment(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "openai_compatible",
            "model": "gpt-fake",
            "api_base": base + "/v1",
            "api_key_env": "OPENAI_API_KEY",
            "input_cost_per_1k": 0.001,
            "output_cost_per_1k": 0.001,
        }

    return {
        "routes": {
            route: {
                "strategy": "adaptive",
                "retries": 0,
                "cache": {"mode": "off"},
                "deployments": [deployment("liked"), deployment("disliked")],
            }
        }
    }


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, database_url: str, key_prefix: str
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("cycle")
    route = f"cyc-{uuid.uuid4().hex[:8]}"
    prefix = f"{key_prefix}cycle{uuid.uuid4().hex[:6]}:"
    with openai_fake() as upstream:
        env = process_env(
            tmp,
            _routes(route, upstream.url),
            redis_url,
            database_url,
            prefix,
            FLYWHEEL_MASTER_KEY=MASTER,
            FLYWHEEL_WEIGHTS_REFRESH_S="0.5",
            FLYWHEEL_CYCLE_INTERVAL_S="3600",  # only the triggered runs in this test
            FLYWHEEL_CYCLE_MIN_OBSERVATIONS="20",
            FLYWHEEL_POLICY="quality_optimized",
            OPENAI_API_KEY="sk-e2e-openai-0123456789",
        )
        port_a, port_b = free_port(), free_port()
        with (tmp / "processes.log").open("wb") as log:
            worker = start_worker(env, log)
            a = start_gateway(env, port_a, log, "--no-access-log")
            b = start_gateway(env, port_b, log, "--no-access-log")
            try:
                for port, proc in ((port_a, a), (port_b, b)):
                    wait_for(f"http://127.0.0.1:{port}/health", proc=proc)
                yield Rig(
                    f"http://127.0.0.1:{port_a}",
                    f"http://127.0.0.1:{port_b}",
                    route,
                    prefix,
                    redis_url,
                )
            finally:
                for proc in (a, b, worker):
                    stop(proc)
        redis = Redis.from_url(redis_url)
        keys = list(redis.scan_iter(match=f"{prefix}*"))
        if keys:
            redis.delete(*keys)
        redis.close()


async def traffic(url: str, route: str, key: str, n: int) -> list[tuple[str, str]]:
    """n chat completions through the official SDK: (completion id, deployment)."""
    out: list[tuple[str, str]] = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:

        async def one() -> None:
            raw = await client.chat.completions.with_raw_response.create(
                model=route, messages=[{"role": "user", "content": uuid.uuid4().hex}]
            )
            completion = raw.parse()
            out.append((completion.id, raw.headers["x-flywheel-deployment"]))

        for _ in range(n // 6):
            await asyncio.gather(*(one() for _ in range(6)))
    return out


def get(url: str, path: str, **params: Any) -> Any:
    resp = httpx.get(url + path, headers=ADMIN, params=params, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_feedback_trigger_run_status_and_a_replica_routing_by_the_weights(rig: Rig) -> None:
    key = asyncio.run(create_key(rig.a, MASTER, name="cycle-e2e"))["key"]
    answers = asyncio.run(traffic(rig.a, rig.route, key, REQUESTS))
    served = Counter(dep for _, dep in answers)
    assert served["liked"] > 5, served
    assert served["disliked"] > 5, served
    with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=10) as client:
        for completion_id, deployment in answers:
            thumbs = "up" if deployment == "liked" else "down"
            resp = client.post(rig.a + "/v1/feedback", json={"id": completion_id, "thumbs": thumbs})
            assert resp.status_code == 202, resp.text
        # Someone else's answer cannot be scored; an unknown one is not found.
        assert (
            client.post(
                rig.a + "/v1/feedback", json={"id": "chatcmpl-nope", "score": 1}
            ).status_code
            == 404
        )

    # A run already holding the cycle: the trigger answers with it instead of queueing.
    redis = Redis.from_url(rig.redis_url)
    holder_key = f"{rig.prefix}cycle:current"
    redis.set(holder_key, "cycle-held-by-test", ex=60)
    held = httpx.post(rig.a + "/v1/virtuous-cycle/trigger", headers=ADMIN, timeout=10)
    assert held.status_code == 202
    assert held.json()["id"] == "cycle-held-by-test"
    assert held.json()["already_running"] is True
    redis.delete(holder_key)
    redis.close()

    # Feedback reaches the rows (the worker consolidates it) before the run looks.
    time.sleep(2.0)
    queued = httpx.post(rig.a + "/v1/virtuous-cycle/trigger", headers=ADMIN, timeout=10)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]
    assert queued.json()["already_running"] is False
    deadline = time.monotonic() + 30
    run: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        runs = get(rig.a, "/v1/virtuous-cycle/runs")["data"]
        done = [r for r in runs if r["job_id"] == job_id and r["status"] != "running"]
        if done:
            run = get(rig.a, f"/v1/virtuous-cycle/runs/{done[0]['id']}")
            break
        time.sleep(0.3)
    assert run is not None, "the triggered run was not recorded"
    assert run["status"] == "completed", run
    figures = run["routes"][rig.route]
    weights = figures["weights"]
    assert weights["liked"] > 0.8 > weights["disliked"], figures
    assert figures["deployments"]["disliked"]["quality"] < 0.1

    status = get(rig.b, "/v1/virtuous-cycle/status")
    shown = status["routes"][rig.route]
    assert shown["weights_source"] == "cycle"
    assert shown["weights"] == pytest.approx(weights, abs=1e-4)
    assert status["last_run"]["id"] == run["id"]

    # Gateway B served none of the traffic; it routes by the published weights.
    time.sleep(1.5)  # its refresh interval is 0.5 s
    on_b = Counter(dep for _, dep in asyncio.run(traffic(rig.b, rig.route, key, 48)))
    assert on_b["liked"] >= 0.75 * 48, on_b
