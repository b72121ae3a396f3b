"""Cache-hit scenario: the gateway answering one identical JSON request from its cache.

A route `bench-cache` (the nginx JSON upstream of bench-json, plus `cache: on`) gets one
request to fill the cache; the next must come back as a hit of the tier under test, then
wrk loads it at c=16 with that same body. Two gateway processes, one after the other:
the default one (L1 hits, in-process) and one with FLYWHEEL_CACHE_L1_MAX_ENTRIES=0, so
every hit is an L2 hit (Redis, the bench's private redis-server).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import check, wrk
from bench.body import ChatBody
from bench.gateway import Gateway, GatewaySetup
from bench.procs import Processes

CONCURRENCY = 16
WARMUP_S = 1.0
HIT_WAIT_S = 3.0  # an L2 write may land a moment after the answer that filled it
ROUTES = """\
routes:
  bench-cache:
    strategy: priority
    cache: {{mode: "on", ttl_s: 3600}}
    deployments:
      - {{name: nginx-json, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/v1"}}
"""
BODY = ChatBody("bench-cache", stream=False, unique=False)


@dataclass(frozen=True)
class Tier:
    name: str  # l1, l2: the figures' prefix is cache.<name>
    header: str  # the x-flywheel-cache value every answer must carry
    setup: GatewaySetup


def tiers(tmp: Path, upstream_port: int, redis_url: str) -> list[Tier]:
    """The two gateway setups (not yet prepared), sharing the bench's Redis."""
    l2_env = (("FLYWHEEL_CACHE_L1_MAX_ENTRIES", "0"),)
    return [
        Tier("l1", "hit-l1", GatewaySetup(tmp / "l1", upstream_port, redis_url, ROUTES)),
        Tier("l2", "hit-l2", GatewaySetup(tmp / "l2", upstream_port, redis_url, ROUTES, l2_env)),
    ]


def _hits(gateway: Gateway, tier: str) -> int | None:
    """The gateway's hit counter of `tier` (GET /metrics/cache); None if unavailable."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    try:
        conn.request("GET", "/metrics/cache")
        resp = conn.getresponse()
        text = resp.read()
        if resp.status != 200:
            return None
        return int(json.loads(text)[tier]["hits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        conn.close()


def _verify_hit(url: str, header: str) -> str:
    """Fill the cache with one request, then insist on a correct answer from `header`."""
    check.verify(url, BODY)
    deadline = time.monotonic() + HIT_WAIT_S
    while True:
        try:
            return check.verify(url, BODY, cache=header)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure(
    procs: Processes, tier: Tier, wrk_bin: str, seconds: float, progress: Callable[[str], None]
) -> dict[str, float]:
    """Start the tier's gateway, verify a hit, load it at c=16, stop it; its figures."""
    gateway, _ = tier.setup.start(procs)
    try:
        url = f"{gateway.url}/v1/chat/completions"
        progress(f"  cache  {tier.name:<8} answers OK ({_verify_hit(url, tier.header)})")
        wrk.run(wrk_bin, url, BODY, connections=CONCURRENCY, seconds=WARMUP_S)
        hits0, cpu0 = _hits(gateway, tier.name), gateway.cpu_seconds()
        res = wrk.run(wrk_bin, url, BODY, connections=CONCURRENCY, seconds=seconds)
        cpu = gateway.cpu_seconds() - cpu0
        hits1 = _hits(gateway, tier.name)
        gateway.check_alive()
    finally:
        procs.stop(gateway.proc)
    key = f"cache.{tier.name}"
    fig = {f"{key}.{name}": v for name, v in res.figures().items()}
    fig[f"{key}.cpu_ms_per_req"] = 1000 * cpu / max(1, res.requests)
    if hits0 is not None and hits1 is not None:
        # wrk does not count the requests still in flight when it stops: cap at 100.
        fig[f"{key}.hit_pct"] = min(100.0, 100.0 * (hits1 - hits0) / max(1, res.requests))
    progress(
        f"  cache  c={CONCURRENCY:<3} {tier.name}-hit   {res.rps:>8.0f} req/s  "
        f"p50 {res.p50_ms:6.2f}  p90 {res.p90_ms:6.2f}  p99 {res.p99_ms:6.2f} ms  "
        f"errors {res.errors}  hits {fig.get(f'{key}.hit_pct', float('nan')):.1f}%"
    )
    return fig


def run_cache(
    procs: Processes,
    cache_tiers: list[Tier],
    wrk_bin: str,
    seconds: float,
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Every tier in turn, each with a gateway of its own; all their figures."""
    fig: dict[str, float] = {}
    for tier in cache_tiers:
        fig.update(measure(procs, tier, wrk_bin, seconds, progress))
    return fig
