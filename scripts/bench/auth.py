"""Auth + limits scenario: what a virtual key with limits costs over the anonymous path.

One gateway process (FLYWHEEL_AUTH=optional, a master key, the bench's Redis, its own
SQLite; the HTTP limits on but out of reach) answers one JSON route at c=1, two ways:
  anon  no Authorization header: neither authentication nor the per-key limiter;
  key   a virtual key with an RPM, a TPM and a monthly budget, all far above what the
        load can reach: the key resolved (in-process cache, then Redis, then the
        database), the prompt counted with tiktoken, RPM/TPM/budget reserved in one
        atomic Redis call, the reservation settled after the answer.
The route has prices, so the budget is charged a real cost. The two sides alternate in
short rounds (anon-key, key-anon, ...) so drift on a shared machine cancels out; each
side's latencies are the median of its rounds' figures, and the added latency is the
median of the rounds' differences (key minus anon).

The measurement must exercise the limiter, so the scenario fails unless one keyed answer
carries x-ratelimit-limit-requests and x-ratelimit-remaining-requests, and unless the
gateway's /metrics show every keyed request admitted by the limiter through Redis (none
decided locally, none refused) and no anonymous request reaching it.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from bench import check, wrk
from bench.body import ChatBody
from bench.gateway import UNREACHABLE_LIMIT, Gateway, GatewaySetup
from bench.procs import BenchError, Processes
from bench.rounds import ROUNDS, added, alternate, priced_routes
from bench.wrk import WrkResult

MASTER_KEY = "bench-master-key-auth-0123456789"
CONNECTIONS = 1
WARMUP_S = 1.0
ROUTE = "bench-auth"
# High enough never to refuse: the bench measures the checks, not refusals.
KEY_SPEC = {
    "name": "bench",
    "rpm": 1_000_000_000,
    "tpm": 1_000_000_000_000,
    "budget_usd": 1_000_000,
    "budget_period": "month",
}
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")
SIDES = ("anon", "key")  # report.AUTH_SIDES names them
_COUNTER = re.compile(
    r"^flywheel_(limiter_decisions|limiter_degraded|limiter_settle_failures|http_limited)_total"
    r'(?:\{\w+="([^"]*)"\})?\s+([0-9.eE+-]+)$',
    re.M,
)


def setup(tmp: Path, upstream_port: int, redis_url: str) -> GatewaySetup:
    """The scenario's gateway (not yet prepared), on the bench's Redis."""
    env = (
        ("FLYWHEEL_MASTER_KEY", MASTER_KEY),
        ("FLYWHEEL_AUTH", "optional"),
        ("FLYWHEEL_HTTP_LIMITS", "true"),
        ("FLYWHEEL_HTTP_LIMIT_IP", UNREACHABLE_LIMIT),
        ("FLYWHEEL_HTTP_LIMIT_CHAT", UNREACHABLE_LIMIT),
    )
    routes = priced_routes(ROUTE)
    return GatewaySetup(tmp, upstream_port, redis_url, routes_template=routes, extra_env=env)


def _call(
    gateway: Gateway, method: str, path: str, body: str | None = None, token: str | None = None
) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body.encode() if body else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def create_key(gateway: Gateway) -> str:
    """A new virtual key with KEY_SPEC's limits; its secret."""
    status, text = _call(gateway, "POST", "/admin/keys", json.dumps(KEY_SPEC), MASTER_KEY)
    try:
        if status != 201:
            raise ValueError(f"status {status}")
        secret = json.loads(text)["key"]
        if not isinstance(secret, str) or not secret:
            raise ValueError("no secret in the answer")
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"auth+limits: POST /admin/keys failed: {exc}\n{text[:2000]}") from exc
    return secret


def limiter_counts(gateway: Gateway) -> dict[str, float]:
    """The limiter's counters from /metrics: `decisions.<result>`, `degraded.<mode>`,
    `settle_failures`, `http_limited`. Fails if the gateway does not expose them: then
    nothing could confirm that the limiter ran."""
    status, text = _call(gateway, "GET", "/metrics")
    counts = {
        f"{name.removeprefix('limiter_')}.{label}".rstrip("."): float(value)
        for name, label, value in _COUNTER.findall(text)
    }
    if status != 200 or "http_limited" not in counts:
        raise BenchError(
            f"auth+limits: GET /metrics ({status}) shows no limiter counters, so the "
            f"scenario cannot confirm the limiter ran\n{text[:2000]}"
        )
    return counts


def _check_round(
    side: str, res: WrkResult, before: dict[str, float], after: dict[str, float]
) -> None:
    """Fail unless the round was what it claims: keyed requests all through the Redis
    limiter and admitted, anonymous ones never in it, nobody refused."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before.keys()}
    delta = {k: v for k, v in delta.items() if v}
    allowed = delta.pop("decisions.allowed", 0.0)
    problems = []
    if res.errors:
        problems.append(f"{res.errors} failed requests (non-2xx {res.non_2xx})")
    if delta:  # refusals, decisions without Redis, HTTP-level refusals
        problems.append(f"limiter counters moved: {delta}")
    if side == "key" and allowed < res.requests:
        problems.append(f"the limiter admitted {allowed:.0f} of {res.requests} keyed requests")
    if side == "anon" and allowed:
        problems.append(f"the limiter admitted {allowed:.0f} anonymous requests")
    if problems:
        raise BenchError(f"auth+limits, {side} side: " + "; ".join(problems))


def _side_figures(side: str, results: list[WrkResult], cpu_s: float) -> dict[str, float]:
    key = f"auth.{side}"
    fig = {
        f"{key}.{name}": statistics.median(getattr(r, name) for r in results)
        for name in ("rps", "p50_ms", "p75_ms", "p90_ms", "p99_ms")
    }
    requests = sum(r.requests for r in results)
    fig[f"{key}.requests"] = requests
    fig[f"{key}.errors"] = sum(r.errors for r in results)
    fig[f"{key}.cpu_ms_per_req"] = 1000 * cpu_s / max(1, requests)
    return fig


def measure(
    procs: Processes,
    gateway_setup: GatewaySetup,
    wrk_bin: str,
    seconds: float,
    unique: bool,
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Start the gateway, make a key, verify both sides, alternate their loads; stop it."""
    gateway, _ = gateway_setup.start(procs)
    body = ChatBody(ROUTE, stream=False, unique=unique)
    url = f"{gateway.url}/v1/chat/completions"
    per_round = max(1.0, round(seconds / ROUNDS))
    cpu = dict.fromkeys(SIDES, 0.0)
    try:
        auth = {"anon": None, "key": f"Bearer {create_key(gateway)}"}
        progress(f"  auth   anon     answers OK ({check.verify(url, body, authorization=None)})")
        try:
            keyed = check.verify(url, body, authorization=auth["key"], require_headers=RATE_HEADERS)
        except RuntimeError as exc:
            raise BenchError(
                f"auth+limits: the keyed answer shows no sign of the limiter: {exc}"
            ) from exc
        progress(f"  auth   key      answers OK ({keyed})")
        for side in SIDES:  # pools, caches, the key's cache entry: off the record
            wrk.run(
                wrk_bin,
                url,
                body,
                connections=CONNECTIONS,
                seconds=WARMUP_S,
                authorization=auth[side],
            )

        def one_round(side: str, n: int) -> WrkResult:
            before, cpu0 = limiter_counts(gateway), gateway.cpu_seconds()
            res = wrk.run(
                wrk_bin,
                url,
                body,
                connections=CONNECTIONS,
                seconds=per_round,
                authorization=auth[side],
            )
            cpu[side] += gateway.cpu_seconds() - cpu0
            gateway.check_alive()
            _check_round(side, res, before, limiter_counts(gateway))
            progress(
                f"  auth   c={CONNECTIONS:<3} {side:<5} r{n + 1}  {res.rps:>8.0f} req/s  "
                f"p50 {res.p50_ms:6.3f}  p90 {res.p90_ms:6.3f}  "
                f"p99 {res.p99_ms:6.3f} ms  errors {res.errors}"
            )
            return res

        results = alternate(SIDES, one_round)
    finally:
        procs.stop(gateway.proc)
    fig: dict[str, float] = {"auth.rounds": ROUNDS, "auth.round_s": per_round}
    for side in SIDES:
        fig.update(_side_figures(side, results[side], cpu[side]))
    fig.update({f"auth.{k}": v for k, v in added(results, "anon", "key").items()})
    fig["auth.added_cpu_ms_per_req"] = (
        fig["auth.key.cpu_ms_per_req"] - fig["auth.anon.cpu_ms_per_req"]
    )
    progress(
        f"  auth   added (key - anon, median of {ROUNDS} rounds): "
        f"p50 {fig['auth.added_p50_ms']:.3f} ms  p99 {fig['auth.added_p99_ms']:.3f} ms  "
        f"cpu/req {fig['auth.added_cpu_ms_per_req']:.3f} ms"
    )
    return fig
