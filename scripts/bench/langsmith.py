"""LangSmith-hanging scenario: what a LangSmith that never answers costs a request.

Two gateway processes on the same upstream and Redis, the same JSON route at c=1:
  off      LangSmith off (the default);
  hanging  LANGSMITH_TRACING=true with LANGSMITH_ENDPOINT at a socket that listens and
           never accepts: connections are made (the kernel's backlog) and then nothing
           is ever answered, the worst a slow LangSmith can do.
Both gateways run throughout and their loads alternate in short rounds (off-hanging,
hanging-off, ...) so drift on a shared machine cancels out; the added latency is the
median of the rounds' differences (hanging minus off).

Not vacuous: after the load the hanging gateway's /metrics must show runs waiting or
dropped (its LangSmith thread is stuck) and none sent, and the other gateway none at all.
"""

from __future__ import annotations

import re
import socket
import statistics
from collections.abc import Callable
from pathlib import Path

from bench import check, wrk
from bench.body import ChatBody
from bench.gateway import Gateway, GatewaySetup
from bench.procs import BenchError, Processes
from bench.rounds import ROUNDS, added, alternate, priced_routes
from bench.wrk import WrkResult

CONNECTIONS = 1
WARMUP_S = 1.0
SIDES = ("off", "hanging")
ROUTE = "bench-ls"
_LS = re.compile(
    r'^flywheel_langsmith_(?:items_total\{outcome="(\w+)"\}|(pending))\s+([0-9.eE+-]+)$', re.M
)


def hanging_socket() -> socket.socket:
    """A listening socket nobody accepts on: LangSmith's requests go in and never return."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def setups(
    tmp: Path, upstream_port: int, redis_url: str, hang_port: int
) -> dict[str, GatewaySetup]:
    hanging = (
        ("LANGSMITH_TRACING", "true"),
        ("LANGSMITH_API_KEY", "lsv2_bench_0123456789abcdef"),
        ("LANGSMITH_ENDPOINT", f"http://127.0.0.1:{hang_port}"),
        ("LANGSMITH_PROJECT", "bench"),
    )
    off = (("LANGSMITH_TRACING", "false"),)
    routes = priced_routes(ROUTE)
    return {
        "off": GatewaySetup(tmp / "off", upstream_port, redis_url, routes, off),
        "hanging": GatewaySetup(tmp / "hanging", upstream_port, redis_url, routes, hanging),
    }


def langsmith_counts(gateway: Gateway) -> dict[str, float]:
    status, _, text = check.get(f"{gateway.url}/metrics")
    if status != 200:
        raise BenchError(f"langsmith: /metrics answered {status}")
    return {outcome or gauge: float(v) for outcome, gauge, v in _LS.findall(text)}


def _check(gateways: dict[str, Gateway], requests: dict[str, int]) -> None:
    off, hanging = langsmith_counts(gateways["off"]), langsmith_counts(gateways["hanging"])
    if off:
        raise BenchError(f"langsmith: the gateway with LangSmith off reports {off}")
    stuck = hanging.get("pending", 0) + hanging.get("dropped", 0)
    if hanging.get("sent", 0) or stuck < 0.9 * requests["hanging"]:
        raise BenchError(
            f"langsmith: the hanging side should hold or drop its {requests['hanging']} runs "
            f"and send none; /metrics says {hanging}"
        )


def measure(
    procs: Processes,
    gateway_setups: dict[str, GatewaySetup],
    wrk_bin: str,
    seconds: float,
    unique: bool,
    progress: Callable[[str], None],
) -> dict[str, float]:
    gateways = {side: gateway_setups[side].start(procs)[0] for side in SIDES}
    body = ChatBody(ROUTE, stream=False, unique=unique)
    per_round = max(1.0, round(seconds / ROUNDS))
    try:
        for side in SIDES:
            url = f"{gateways[side].url}/v1/chat/completions"
            progress(f"  ls     {side:<8} answers OK ({check.verify(url, body)})")
            wrk.run(wrk_bin, url, body, connections=CONNECTIONS, seconds=WARMUP_S)

        def one_round(side: str, n: int) -> WrkResult:
            url = f"{gateways[side].url}/v1/chat/completions"
            res = wrk.run(wrk_bin, url, body, connections=CONNECTIONS, seconds=per_round)
            gateways[side].check_alive()
            progress(
                f"  ls     c={CONNECTIONS:<3} {side:<8} r{n + 1}  {res.rps:>8.0f} req/s  "
                f"p50 {res.p50_ms:6.3f}  p99 {res.p99_ms:6.3f} ms  errors {res.errors}"
            )
            return res

        results = alternate(SIDES, one_round)
        # Warm-up and check requests count too: everything the hanging side answered.
        _check(gateways, {s: sum(r.requests for r in results[s]) for s in SIDES})
    finally:
        for gateway in gateways.values():
            procs.stop(gateway.proc)
    fig: dict[str, float] = {"ls.rounds": ROUNDS, "ls.round_s": per_round}
    for side in SIDES:
        for name in ("rps", "p50_ms", "p99_ms"):
            fig[f"ls.{side}.{name}"] = statistics.median(getattr(r, name) for r in results[side])
        fig[f"ls.{side}.errors"] = sum(r.errors for r in results[side])
    fig.update({f"ls.{k}": v for k, v in added(results, "off", "hanging").items()})
    progress(
        f"  ls     added (hanging - off, median of {ROUNDS} rounds): "
        f"p50 {fig['ls.added_p50_ms']:.3f} ms  p99 {fig['ls.added_p99_ms']:.3f} ms"
    )
    return fig
