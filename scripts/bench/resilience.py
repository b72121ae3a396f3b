"""Resilience scenarios: hedging against a slow tail, adaptive concurrency against a cap.

A small aiohttp upstream (in a thread of the bench process; speed is not measured here)
serves four OpenAI-shaped endpoints:
  /tail   90% of answers in 20 ms, 7% in 1 s, 3% in 3 s (p95 ~1 s, p99 ~3 s)
  /fast   20 ms
  /cap, /cap2   50 ms, but 429 when more than 8 requests are in flight
The gateway gets a hedged and an unhedged route over tail+fast, and a limited and an
unlimited route over the capped endpoints. Loads come from an aiohttp client.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.gateway import Gateway, GatewaySetup
from bench.procs import Processes

MASTER_KEY = "bench-master-key-0123456789"
CAP = 8
ROUTES = """\
routes:
  hedged:
    strategy: priority
    hedging: {{quantile: 0.95}}
    deployments:
      - {{name: tail, provider: openai_compatible, model: m, priority: 0,
          api_base: "http://127.0.0.1:{port}/tail/v1"}}
      - {{name: fast, provider: openai_compatible, model: m, priority: 1,
          api_base: "http://127.0.0.1:{port}/fast/v1"}}
  unhedged:
    strategy: priority
    deployments:
      - {{name: tail, provider: openai_compatible, model: m, priority: 0,
          api_base: "http://127.0.0.1:{port}/tail/v1"}}
      - {{name: fast, provider: openai_compatible, model: m, priority: 1,
          api_base: "http://127.0.0.1:{port}/fast/v1"}}
  limited:
    deployments:
      - {{name: cap, provider: openai_compatible, model: m,
          api_base: "http://127.0.0.1:{port}/cap/v1"}}
  unlimited:
    concurrency: {{adaptive: false}}
    deployments:
      - {{name: cap2, provider: openai_compatible, model: m,
          api_base: "http://127.0.0.1:{port}/cap2/v1"}}
"""
ANSWER = {
    "id": "chatcmpl-r",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "ok"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


@dataclass
class Upstream:
    counter: int = 0
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)

    def app(self) -> web.Application:
        app = web.Application()
        for kind in ("tail", "fast", "cap", "cap2"):
            app.router.add_post(f"/{kind}/v1/chat/completions", self._handler(kind))
        return app

    def _handler(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            if kind.startswith("cap"):
                return await self._capped(kind)
            delay = 0.02
            if kind == "tail":
                self.counter += 1
                slot = self.counter % 100
                delay = 3.0 if slot >= 97 else 1.0 if slot >= 90 else 0.02
            await asyncio.sleep(delay)
            return web.json_response(ANSWER)

        return handle

    async def _capped(self, kind: str) -> web.Response:
        if self.in_flight[kind] >= CAP:
            self.rejected[kind] += 1
            err = {
                "error": {
                    "message": "Rate limit reached",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
            return web.json_response(err, status=429)
        self.in_flight[kind] += 1
        self.peak[kind] = max(self.peak[kind], self.in_flight[kind])
        try:
            await asyncio.sleep(0.05)
        finally:
            self.in_flight[kind] -= 1
        return web.json_response(ANSWER)


class ThreadServer:
    """The upstream on 127.0.0.1 in its own thread and event loop."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.upstream.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _load(url: str, model: str, concurrency: int, seconds: float) -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.post(
                    url, data=body, headers={"content-type": "application/json"}
                ) as r:
                    await r.read()
                    statuses[r.status] += 1
                if r.status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"statuses": dict(statuses), **_percentiles(latencies)}


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    ordered = sorted(ms)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "n": len(ordered),
    }


async def _limit_of(gateway_url: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gateway_url + "/admin/cooldowns", headers={"authorization": f"Bearer {MASTER_KEY}"}
        ) as r,
    ):
        data = await r.json()
    return next(d["concurrency"]["limit"] for d in data["data"] if d["route"] == "limited")


async def _scenarios(gw: Gateway, upstream_url: str, seconds: float) -> dict[str, Any]:
    chat = gw.url + "/v1/chat/completions"
    await _load(chat, "hedged", 4, 2.0)  # warm: the hedge needs time-to-first-byte history
    out: dict[str, Any] = {
        "tail_direct": await _load(upstream_url + "/tail/v1/chat/completions", "m", 8, seconds),
        "hedged": await _load(chat, "hedged", 8, seconds),
        "unhedged": await _load(chat, "unhedged", 8, seconds),
        "limited": await _load(chat, "limited", 64, seconds),
        "unlimited": await _load(chat, "unlimited", 64, seconds),
    }
    out["limited"]["final_limit"] = await _limit_of(gw.url)
    return out


def run_resilience(procs: Processes, tmp: Path, redis_url: str, seconds: float) -> dict[str, Any]:
    upstream = Upstream()
    with ThreadServer(upstream) as server:
        setup = GatewaySetup(
            tmp,
            server.port,
            redis_url,
            routes_template=ROUTES,
            extra_env=(("FLYWHEEL_MASTER_KEY", MASTER_KEY),),
        )
        setup.prepare()
        gateway, _ = setup.start(procs)
        try:
            upstream_url = f"http://127.0.0.1:{server.port}"
            figures = asyncio.run(_scenarios(gateway, upstream_url, seconds))
        finally:
            procs.stop(gateway.proc)
    for route, kind in (("limited", "cap"), ("unlimited", "cap2")):
        figures[route]["upstream_429s"] = upstream.rejected[kind]
        figures[route]["upstream_peak_in_flight"] = upstream.peak[kind]
    return figures


def render(fig: dict[str, Any]) -> str:
    def row(name: str, f: dict[str, Any]) -> str:
        return (
            f"  {name:<26} p50 {f['p50_ms']:8.1f} ms  p99 {f['p99_ms']:8.1f} ms  "
            f"answers {f['n']:5d}  statuses {f['statuses']}"
        )

    lines = [
        "",
        "Hedging: slow-tailed deployment (p95 ~1 s, p99 ~3 s) + fast one, concurrency 8",
        row("slow deployment, direct", fig["tail_direct"]),
        row("gateway, hedging on", fig["hedged"]),
        row("gateway, hedging off", fig["unhedged"]),
        "",
        f"Adaptive concurrency: upstream answers 429 above {CAP} in flight; 64 clients",
    ]
    for name in ("limited", "unlimited"):
        f = fig[name]
        lines.append(
            f"  {'limiter on' if name == 'limited' else 'limiter off':<12} client statuses "
            f"{f['statuses']}  upstream 429s {f['upstream_429s']}  upstream peak in flight "
            f"{f['upstream_peak_in_flight']}  p50 {f['p50_ms']:.0f} ms"
        )
    lines.append(f"  limiter's learned limit: {fig['limited']['final_limit']}")
    return "\n".join(lines)
