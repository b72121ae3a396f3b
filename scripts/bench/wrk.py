"""Run wrk against one URL for a bounded time and parse its `--latency` report."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.body import AUTHORIZATION, ChatBody

LUA = Path(__file__).with_name("post.lua")
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}

_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.M)


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def figures(self) -> dict[str, float]:
        return {**asdict(self), "errors": float(self.errors)}


def parse(output: str) -> WrkResult:
    """The numbers of a `wrk --latency` report; raises ValueError if it has none."""
    pct = {int(p): float(v) * UNITS_MS[u] for p, v, u in _PERCENTILE.findall(output)}
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None or set(pct) != {50, 75, 90, 99}:
        raise ValueError(f"unexpected wrk output:\n{output}")
    sock = _SOCKET.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_ms=pct[50],
        p75_ms=pct[75],
        p90_ms=pct[90],
        p99_ms=pct[99],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


def run(
    wrk: str,
    url: str,
    body: ChatBody,
    *,
    connections: int,
    seconds: float,
    authorization: str | None = AUTHORIZATION,
) -> WrkResult:
    """POST `body` to `url` from `connections` keep-alive connections for `seconds`,
    with `authorization` as the Authorization header (None: no such header)."""
    threads = 1 if connections < 16 else 2
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(LUA),
        url,
    ]
    env = {**os.environ, "BENCH_BODY": body.static, "BENCH_AUTHORIZATION": authorization or ""}
    if (parts := body.parts()) is not None:
        env.update(BENCH_BODY_PREFIX=parts[0], BENCH_BODY_SUFFIX=parts[1])
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)
