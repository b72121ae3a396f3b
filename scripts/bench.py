"""`make bench`: the gateway's overhead against a fast fake OpenAI upstream (nginx).

For JSON and streaming chat completions at concurrency 1, 16 and 64, wrk drives load
for a bounded time straight at nginx and then through the gateway, in the same run, so
"added" figures are gateway minus direct. Also measured: time to first token (c=1),
the gateway's RSS idle and after load, its cold start, and cache hits (one identical
JSON request answered from L1, then from L2 by a gateway without L1; c=16), and what
authentication + per-key rate limiting cost (auth+limits: one gateway, c=1, requests
without a key and with a virtual key that has RPM, TPM and a budget, alternating; see
bench/auth.py), and the Batch API (bench/batch.py: batch throughput at
FLYWHEEL_BATCH_CONCURRENCY 1, 8 and 32 against a 200 ms upstream, and live JSON latency
at c=8 alone and while a batch runs, on another route and on the live route itself).
Everything listens on 127.0.0.1 only and every process started here is stopped on exit,
including Ctrl-C.

    .venv/bin/python scripts/bench.py [--quick | --seconds S] [--repeat N] [--json out.json]
                                      [--no-cache] [--no-resilience] [--no-auth | --auth-only]
                                      [--no-batch | --batch-only]

Only the auth+limits scenario (nginx, Redis and that scenario's gateway, nothing else):

    .venv/bin/python scripts/bench.py --auth-only [--seconds S] [--repeat N]

Only the Batch API scenario (nginx, Redis, the 200 ms upstream, a gateway and workers;
the live loads last 1.5 x S, 15 s by default; a few minutes per repeat):

    .venv/bin/python scripts/bench.py --batch-only [--seconds S] [--repeat N] [--json out.json]

It is a report, not a test: it exits 0 when the run completed, whether or not targets
were met (pass --strict to exit 1 on a missed target).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import auth, batch, cache, check, langsmith, report, ttft, wrk
from bench.body import ChatBody
from bench.gateway import Gateway, GatewaySetup, start_measured, start_reference
from bench.procs import BenchError, Processes
from bench.report import CONCURRENCY, Figures
from bench.resilience import render as render_resilience
from bench.resilience import run_resilience
from bench.upstream import nginx_binary, start_nginx, start_redis

MISSING_TOOLS = 2
WARMUP_S = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Only the auth+limits scenario (authenticated + rate-limited requests against "
        "unauthenticated ones, same gateway): scripts/bench.py --auth-only [--seconds S] "
        "[--repeat N]",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="load per cell (10)")
    parser.add_argument("--quick", action="store_true", help="3 s per cell, 100 TTFT requests")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole matrix")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here")
    parser.add_argument("--ttft-requests", type=int, default=300, help="per side (300)")
    parser.add_argument("--cold-starts", type=int, default=3, help="gateway starts (3)")
    parser.add_argument("--direct-only", action="store_true", help="skip the gateway")
    parser.add_argument(
        "--same-prompt",
        action="store_true",
        help="send one identical body (a response cache would answer from memory)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--no-resilience", action="store_true", help="skip the hedging/concurrency scenarios"
    )
    parser.add_argument("--no-cache", action="store_true", help="skip the cache-hit scenario")
    auth_group = parser.add_mutually_exclusive_group()
    auth_group.add_argument("--no-auth", action="store_true", help="skip the auth+limits scenario")
    auth_group.add_argument(
        "--auth-only",
        action="store_true",
        help="run only the auth+limits scenario (nginx, Redis and its own gateway): JSON at "
        "c=1 without a key and with a rate-limited virtual key, alternating in 4 rounds of "
        "S/4 s (at least 1 s) per side",
    )
    ls_group = parser.add_mutually_exclusive_group()
    ls_group.add_argument(
        "--no-langsmith", action="store_true", help="skip the LangSmith-hanging scenario"
    )
    ls_group.add_argument(
        "--langsmith-only",
        action="store_true",
        help="run only the LangSmith-hanging scenario: JSON at c=1 with LangSmith off and "
        "with LangSmith at a server that never answers, alternating in 4 rounds",
    )
    batch_group = parser.add_mutually_exclusive_group()
    batch_group.add_argument("--no-batch", action="store_true", help="skip the Batch API scenario")
    batch_group.add_argument(
        "--batch-only",
        action="store_true",
        help="run only the Batch API scenario: batch throughput at concurrency 1, 8 and 32 "
        "against a 200 ms upstream, then live JSON at c=8 for 1.5 x S s alone and while a "
        "batch runs (on another route, on the live route); --repeat N runs it N times",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 3.0
        args.ttft_requests = min(args.ttft_requests, 100)
    if args.seconds <= 0 or args.seconds > 600 or args.repeat < 1 or args.ttft_requests < 1:
        parser.error("need 0 < --seconds <= 600, --repeat >= 1, --ttft-requests >= 1")
    if (args.auth_only or args.langsmith_only) and args.direct_only:
        parser.error("--auth-only and --langsmith-only need a gateway, not --direct-only")
    if sum((args.auth_only, args.langsmith_only, args.batch_only)) > 1:
        parser.error("--auth-only, --langsmith-only, --batch-only: one scenario only, or none")
    if args.batch_only and args.direct_only:
        parser.error("--batch-only needs a gateway, not --direct-only")
    return args


def find_tools() -> tuple[str, str] | None:
    nginx, wrk_bin = nginx_binary(), shutil.which("wrk")
    if nginx and wrk_bin:
        return nginx, wrk_bin
    missing = " and ".join(n for n, p in (("nginx", nginx), ("wrk", wrk_bin)) if not p)
    print(
        f"bench: {missing} not found (searched PATH and /usr/sbin).\n"
        "Install the Debian packages first:  apt-get install nginx-light wrk",
        file=sys.stderr,
    )
    return None


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Run:
    """One pass over the whole matrix; collects its figures."""

    def __init__(
        self, args: argparse.Namespace, wrk_bin: str, nginx_port: int, reference: str | None
    ) -> None:
        self.args = args
        self.wrk_bin = wrk_bin
        self.direct = f"http://127.0.0.1:{nginx_port}"
        self.reference = reference
        self.fig: Figures = {}

    def sides(self, kind: str, gateway: Gateway | None) -> list[tuple[str, str, ChatBody]]:
        """(side, url, body) for one kind of request: direct to nginx, then via the gateway."""
        stream = kind == "stream"
        unique = not self.args.same_prompt
        path = "/stream/v1/chat/completions" if stream else "/v1/chat/completions"
        sides = [("direct", self.direct + path, ChatBody("gpt-4o-mini", stream, unique))]
        if self.reference is not None and not stream:
            url = f"{self.reference}/v1/chat/completions"
            sides.append(("reference", url, ChatBody("gpt-4o-mini", stream, unique)))
        if gateway is not None:
            body = ChatBody(f"bench-{kind}", stream, unique)
            sides.append(("gateway", f"{gateway.url}/v1/chat/completions", body))
        return sides

    def load(self, gateway: Gateway | None) -> None:
        for kind, _ in report.KINDS:
            for side, url, body in self.sides(kind, gateway):
                progress(f"  {kind:<6} {side:<8} answers OK ({check.verify(url, body)})")
                if side != "direct":  # pools, caches and lazy imports, off the record
                    wrk.run(self.wrk_bin, url, body, connections=16, seconds=WARMUP_S)
            for c in CONCURRENCY:
                for side, url, body in self.sides(kind, gateway):
                    cpu = gateway.cpu_seconds() if gateway else 0.0
                    res = wrk.run(self.wrk_bin, url, body, connections=c, seconds=self.args.seconds)
                    key = f"{kind}.c{c}.{side}"
                    self.fig.update({f"{key}.{name}": v for name, v in res.figures().items()})
                    if gateway is not None and side == "gateway":
                        gateway.check_alive()
                        cpu = gateway.cpu_seconds() - cpu
                        self.fig[f"{key}.cpu_ms_per_req"] = 1000 * cpu / max(1, res.requests)
                    progress(
                        f"  {kind:<6} c={c:<3} {side:<8} {res.rps:>8.0f} req/s  "
                        f"p50 {res.p50_ms:6.2f}  p90 {res.p90_ms:6.2f}  "
                        f"p99 {res.p99_ms:6.2f} ms  errors {res.errors}"
                    )

    def time_to_first_token(self, gateway: Gateway | None) -> None:
        for side, url, body in self.sides("stream", gateway):
            res = ttft.measure(url, body, requests=self.args.ttft_requests)
            self.fig[f"ttft.{side}.median_ms"] = res.median_ms
            self.fig[f"ttft.{side}.p99_ms"] = res.p99_ms
            progress(
                f"  TTFT   c=1   {side:<8} median {res.median_ms:.3f} ms  "
                f"p99 {res.p99_ms:.3f} ms  ({res.samples} requests)"
            )


def run_once(
    procs: Processes,
    run: Run,
    setup: GatewaySetup | None,
    cache_tiers: list[cache.Tier],
    auth_setup: GatewaySetup | None,
    ls_setups: dict[str, GatewaySetup] | None = None,
) -> Figures:
    """Start a gateway (measuring cold starts and idle RSS), load it, stop it; then the
    cache-hit, auth+limits and LangSmith scenarios on gateways of their own."""
    only = run.args.auth_only or run.args.langsmith_only
    steal = steal_share() if only else load_main(procs, run, setup, cache_tiers)
    unique = not run.args.same_prompt
    seconds = run.args.seconds
    if auth_setup is not None:
        run.fig.update(auth.measure(procs, auth_setup, run.wrk_bin, seconds, unique, progress))
    if ls_setups is not None:
        run.fig.update(langsmith.measure(procs, ls_setups, run.wrk_bin, seconds, unique, progress))
    run.fig["cpu_steal_pct"] = steal()
    progress(f"  CPU stolen by the host during this run: {run.fig['cpu_steal_pct']:.1f}%")
    report.add_derived(run.fig)
    return run.fig


def load_main(
    procs: Processes, run: Run, setup: GatewaySetup | None, cache_tiers: list[cache.Tier]
) -> Callable[[], float]:
    """The main gateway's matrix, TTFT, RSS and cold starts, then the cache tiers; the
    steal measurement, started once the gateway is up."""
    gateway: Gateway | None = None
    if setup is not None:
        gateway, cold = start_measured(procs, setup, run.args.cold_starts)
        time.sleep(0.5)
        run.fig.update(cold_start_s=cold, **{"rss.idle_mb": gateway.rss_mb()})
        progress(
            f"  gateway up on {gateway.url}: cold start {cold:.3f} s (median), "
            f"idle RSS {run.fig['rss.idle_mb']:.1f} MB"
        )
    steal = steal_share()
    try:
        run.load(gateway)
        run.time_to_first_token(gateway)
        if gateway is not None:
            run.fig["rss.after_load_mb"] = gateway.rss_mb()
    finally:
        if gateway is not None:
            procs.stop(gateway.proc)
    run.fig.update(cache.run_cache(procs, cache_tiers, run.wrk_bin, run.args.seconds, progress))
    return steal


def steal_share() -> Callable[[], float]:
    """Start measuring the share of CPU time the hypervisor took (/proc/stat `steal`).

    On a shared virtual machine this is the noise: a run with a high steal share is
    slower for reasons outside the gateway, and is reported so it can be discounted.
    """

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[7] if len(fields) > 7 else 0, sum(fields)

    steal0, total0 = read()

    def done() -> float:
        steal1, total1 = read()
        return 100.0 * (steal1 - steal0) / max(1, total1 - total0)

    return done


def tool_versions(nginx: str, wrk_bin: str) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        return next(iter((done.stderr or done.stdout).strip().splitlines()), "")

    return {
        "nginx": first_line([nginx, "-v"]),
        "wrk": first_line([wrk_bin, "-v"]),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
    }


def write_json(
    path: Path,
    args: argparse.Namespace,
    meta: dict[str, str],
    runs: list[Figures],
    med: Figures,
    resilience: dict[str, Any] | None,
    batch_result: dict[str, Any] | None = None,
) -> None:
    out: dict[str, Any] = {
        "resilience": resilience,
        "batch": batch_result,
        "meta": {
            **meta,
            "seconds_per_cell": args.seconds,
            "repeat": args.repeat,
            "ttft_requests": args.ttft_requests,
            "concurrency": list(CONCURRENCY),
            "cache_scenario": not args.no_cache and not args.auth_only,
            "auth_scenario": not args.no_auth and not args.direct_only,
            "langsmith_scenario": not args.no_langsmith and not args.direct_only,
            "batch_scenario": batch_result is not None,
        },
        "runs": runs,
        "median": med,
        "targets": [
            {
                "label": t.label,
                "figure": t.key,
                "op": t.op,
                "limit": t.limit,
                "value": med.get(t.key),
                "verdict": t.verdict(med),
            }
            for t in report.targets()
        ],
    }
    path.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = find_tools()
    if tools is None:
        return MISSING_TOOLS
    nginx, wrk_bin = tools
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, CI: clean up like Ctrl-C
    started = time.perf_counter()
    runs: list[Figures] = []
    resilience: dict[str, Any] | None = None
    batch_result: dict[str, Any] | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="flywheel-bench-") as tmp_name,
            Processes() as procs,
        ):
            tmp = Path(tmp_name)
            _, nginx_port = start_nginx(procs, tmp / "nginx", nginx)
            setup = None
            auth_setup = None
            reference = None
            cache_tiers: list[cache.Tier] = []
            ls_setups = None
            hang = langsmith.hanging_socket()
            hang_port = hang.getsockname()[1]
            if args.auth_only:
                auth_setup = auth.setup(tmp / "auth", nginx_port, start_redis(procs, tmp))
            elif args.langsmith_only:
                redis_url = start_redis(procs, tmp)
                ls_setups = langsmith.setups(tmp / "ls", nginx_port, redis_url, hang_port)
            elif not args.direct_only and not args.batch_only:  # batch: its own, below
                setup = GatewaySetup(tmp / "gateway", nginx_port, start_redis(procs, tmp))
                reference = start_reference(procs, tmp / "reference", nginx_port)
                if not args.no_cache:
                    cache_tiers = cache.tiers(tmp / "cache", nginx_port, setup.redis_url)
                if not args.no_auth:
                    auth_setup = auth.setup(tmp / "auth", nginx_port, setup.redis_url)
                if not args.no_langsmith:
                    ls_setups = langsmith.setups(tmp / "ls", nginx_port, setup.redis_url, hang_port)
            if setup is not None:
                setup.prepare()
            for tier in cache_tiers:
                tier.setup.prepare()
            if auth_setup is not None:
                auth_setup.prepare()
            for ls_setup in (ls_setups or {}).values():
                ls_setup.prepare()
            for i in range(0 if args.batch_only else args.repeat):
                progress(f"run {i + 1}/{args.repeat} ({args.seconds:g} s per cell)")
                run = Run(args, wrk_bin, nginx_port, reference)
                runs.append(run_once(procs, run, setup, cache_tiers, auth_setup, ls_setups))
            hang.close()
            if setup is not None and not args.no_resilience:
                progress("resilience scenarios (hedging, adaptive concurrency)")
                resilience = run_resilience(
                    procs, tmp / "resilience", setup.redis_url, max(args.seconds, 4.0)
                )
            if args.batch_only or (setup is not None and not args.no_batch):
                progress("Batch API scenario (throughput, live latency beside a batch)")
                redis_url = setup.redis_url if setup is not None else start_redis(procs, tmp)
                steal = steal_share()
                batch_result = batch.run_batch(
                    procs,
                    tmp / "batch",
                    nginx_port,
                    redis_url,
                    wrk_bin,
                    args.repeat,
                    max(5.0, round(1.5 * args.seconds)),
                    progress,
                )
                batch_result["meta"]["cpu_steal_pct"] = steal()
    except KeyboardInterrupt:
        print("\nbench: interrupted; processes stopped.", file=sys.stderr)
        return 130
    except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if args.batch_only:
        assert batch_result is not None
        print(batch.render(batch_result).lstrip("\n"))
        print(f"\n(wall time {time.perf_counter() - started:.0f} s, {os.cpu_count()} CPUs)")
        if args.json is not None:
            write_json(args.json, args, tool_versions(nginx, wrk_bin), [], {}, None, batch_result)
            print(f"numbers written to {args.json}")
        return 0
    med = report.medians(runs)
    prompts = "one identical prompt" if args.same_prompt else "a unique prompt per request"
    print(
        f"Flywheel bench: {args.seconds:g} s per cell, {len(runs)} run(s), {prompts}, "
        f"{args.ttft_requests} TTFT requests per side"
    )
    print(report.render(med, len(runs)))
    if resilience is not None:
        print(render_resilience(resilience))
    if batch_result is not None:
        print(batch.render(batch_result))
    steals = ", ".join(f"{r.get('cpu_steal_pct', 0.0):.0f}%" for r in runs)
    print(f"\nCPU stolen by the host, per run: {steals} (noise outside the gateway)")
    print(
        f"\n(wall time {time.perf_counter() - started:.0f} s, {os.cpu_count()} CPUs; "
        "nginx, wrk and the gateway share them)"
    )
    if args.json is not None:
        meta = tool_versions(nginx, wrk_bin)
        write_json(args.json, args, meta, runs, med, resilience, batch_result)
        print(f"numbers written to {args.json}")
    missed = [t for t in report.targets() if t.verdict(med) == "MISS"]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
