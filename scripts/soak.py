"""`make soak`: a long steady load through real processes, to see that nothing grows.

A fake OpenAI upstream (bench's nginx, plus a location that fails 1 call in 4), Redis
and a database (the local ones when they answer, else a private redis-server and
SQLite; see soak/rig.py), one gateway (uvicorn, as production runs it) and one arq
worker, all on 127.0.0.1. An open-loop load at a fixed rate (soak/load.py) sends a mix
of cache hits, cache misses, SSE streams (fresh and replayed), requests to the flaky
upstream and client errors (unknown model, malformed body) for a fixed time
(soak/traffic.py). Every minute it prints the minute's rates, latency percentiles,
errors by kind (expected vs unexpected) and the gateway's and worker's RSS; at the end a
summary and a verdict on memory (soak/report.py), also written as markdown to
var/soak/soak-<timestamp>.md.

    .venv/bin/python scripts/soak.py [--minutes 10] [--rate 100] [--warmup-minutes 1]
                                     [--redis auto|local|embedded] [--db auto|postgres|sqlite]

Exit status: 0 when every answer was right or an expected error and memory stayed flat;
1 when an unexpected error occurred, a process died or memory grew; 2 when nginx is
missing; 130 when interrupted. Every process it started is stopped on the way out
(Ctrl-C and SIGTERM included), its Redis keys are deleted and its PostgreSQL database
dropped. It is not part of the test suite: it takes minutes, and its verdict wants a
quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from types import FrameType

from bench.gateway import REPO
from bench.procs import BenchError, Processes, log_tail
from bench.upstream import nginx_binary
from soak import report, rig
from soak.load import Minute, Outcome, Soak
from soak.traffic import KINDS, cache_write_share

MISSING_TOOLS = 2
INTERRUPTED = 130


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10, help="length of the load (10)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (100)")
    parser.add_argument(
        "--warmup-minutes", type=int, default=1, help="minutes before memory is judged (1)"
    )
    parser.add_argument(
        "--redis",
        choices=("auto", "local", "embedded"),
        default="auto",
        help="local: 127.0.0.1:6379 DB 14; embedded: a private redis-server; auto: local if up",
    )
    parser.add_argument(
        "--db",
        choices=("auto", "postgres", "sqlite"),
        default="auto",
        help="postgres: a fresh database on 127.0.0.1:5432; auto: that if it answers, else SQLite",
    )
    parser.add_argument("--pg-admin", default=rig.PG_ADMIN, help="where to CREATE DATABASE")
    parser.add_argument("--max-in-flight", type=int, default=512, help="cap (512)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, s (30)")
    parser.add_argument("--seed", type=int, default=1, help="of the traffic mix (1)")
    parser.add_argument("--out", type=Path, help="markdown report (var/soak/soak-<time>.md)")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup_minutes < args.minutes <= 24 * 60:
        parser.error("need 1 <= --warmup-minutes < --minutes <= 1440")
    if not 0 < args.rate <= 5000 or args.max_in_flight < 1 or args.timeout <= 0:
        parser.error("need 0 < --rate <= 5000, --max-in-flight >= 1, --timeout > 0")
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def l1_entries(rate: float) -> int:
    """The L1 cache's size for the run: half a minute of its cache writes.

    The default (10,000 entries) would take most of a 10-minute run at 100 req/s to fill,
    and a cache filling up towards its bound looks exactly like a leak. Sized like this it
    is full within the warm-up, and from then on every write evicts: the steady state of
    a gateway that has run for days, which is what the memory verdict is about.
    """
    return max(100, round(rate * cache_write_share() * 30))


def describe(args: argparse.Namespace, r: rig.Rig, l1: int) -> list[str]:
    mix = "; ".join(f"{k.name} {k.weight}% ({k.describe})" for k in KINDS)
    return [
        f"{args.rate:g} req/s for {args.minutes} min, open loop; memory judged after "
        f"{args.warmup_minutes} min of warm-up.",
        f"Processes on 127.0.0.1: nginx (fake upstream), one gateway (uvicorn, uvloop, "
        f"httptools), one arq worker; Redis: {r.redis}; database: {r.database}; "
        f"L1 cache {l1} entries; {rig.description()}.",
        f"Mix: {mix}.",
    ]


def verdict(outcome: Outcome, memory: Sequence[report.Memory]) -> list[str]:
    """Why the run failed ([] when it passed)."""
    why = []
    if outcome.aborted is not None:
        why.append(f"aborted: {outcome.aborted.splitlines()[0]}")
    if unexpected := report.unexpected(outcome):
        why.append(f"{sum(unexpected.values())} unexpected error(s)")
    if not memory and outcome.aborted is None:
        why.append("no memory verdict")
    why += [f"{m.process} memory grew {m.growth_mb:+.1f} MB" for m in memory if not m.flat]
    return why


def write_markdown(
    path: Path, head: list[str], outcome: Outcome, tail: list[str], failed: list[str]
) -> None:
    result = f"FAIL ({'; '.join(failed)})" if failed else "PASS"
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = [
        f"## Soak run, {stamp}",
        "",
        "\n\n".join(head),
        "",
        "### Per minute",
        "",
        report.markdown_rows(outcome.minutes),
        "",
        *tail,
        "",
        f"**Result: {result}.**",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")


def save_logs(path: Path, r: rig.Rig) -> Path:
    """The end of the gateway's and worker's logs, next to the report (for a failed run)."""
    logs = path.with_suffix(".logs.txt")
    logs.write_text(log_tail(r.gateway.log, 200) + "\n" + log_tail(r.worker_log, 200) + "\n")
    return logs


def run(args: argparse.Namespace, nginx: str, out: Path) -> int:
    l1 = l1_entries(args.rate)
    with (
        ExitStack() as stack,  # left last: keys and the database go after the processes
        tempfile.TemporaryDirectory(prefix="flywheel-soak-") as tmp_name,
        Processes() as procs,
    ):
        r = rig.start(
            procs,
            stack,
            Path(tmp_name),
            nginx,
            redis_mode=args.redis,
            db_mode=args.db,
            pg_admin=args.pg_admin,
            extra_env={"FLYWHEEL_CACHE_L1_MAX_ENTRIES": str(l1)},
            progress=progress,
        )
        head = describe(args, r, l1)
        print("\n".join(head) + "\n", flush=True)
        print(report.HEADER, flush=True)

        def on_minute(minute: Minute) -> None:
            print(report.row(minute), flush=True)

        soak = Soak(
            r,
            rate=args.rate,
            minutes=args.minutes,
            seed=args.seed,
            max_in_flight=args.max_in_flight,
            timeout_s=args.timeout,
            on_minute=on_minute,
        )
        outcome = asyncio.run(soak.run())
        memory = report.memory(outcome.samples, 60.0 * args.warmup_minutes)
        tail = report.summary(outcome, args.warmup_minutes, memory)
        failed = verdict(outcome, memory)
        print("\n" + "\n".join(tail), flush=True)
        write_markdown(out, head, outcome, tail, failed)
        if failed:
            print(f"\nsoak: FAIL: {'; '.join(failed)}", flush=True)
            print(f"soak: logs of the gateway and worker: {save_logs(out, r)}", flush=True)
        else:
            print("\nsoak: PASS: no unexpected errors, memory flat", flush=True)
        print(f"soak: report written to {out}", flush=True)
        progress("soak: stopping processes, deleting keys")
    return 1 if failed else 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nginx = nginx_binary()
    if nginx is None:
        progress("soak: nginx not found (PATH, /usr/sbin). Install it: apt-get install nginx-light")
        return MISSING_TOOLS
    out = args.out or REPO / "var" / "soak" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.md"
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, a CI runner: clean up as on Ctrl-C
    try:
        return run(args, nginx, out)
    except KeyboardInterrupt:
        print("\nsoak: interrupted; processes stopped, keys deleted.", file=sys.stderr)
        return INTERRUPTED
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
