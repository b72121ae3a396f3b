"""Batch API scenario: how fast batches run, and what a running batch costs live traffic.

One gateway (uvicorn, the master key, its own SQLite and var dir, the bench's Redis under
a prefix of its own) and one arq worker at a time, sharing the var dir (files) and the
database. Two upstreams: nginx (answers at once) and a fake OpenAI server started here
that answers every chat completion after 200 ms (`serve_slow`, a subprocess).

1. Throughput vs FLYWHEEL_BATCH_CONCURRENCY (1, 8, 32; a fresh worker for each): a file
   sized to last about 6 s at the ideal rate (c / 0.2 s) runs on the 200 ms route; the
   batch is polled every 50 ms and its rate is lines / (first poll seeing `in_progress`
   -> first poll seeing `finalizing` or `completed`). The API's own stamps are whole
   seconds, shown as a cross-check. Every line must complete, each with one upstream call.
2. Live JSON traffic (wrk, c=8, unique prompts) through the gateway to nginx, three ways:
   alone; while a batch (c=32, enough lines to outlast the load) runs on the 200 ms
   route; while one runs on the live route itself (same deployment: the worker checks
   whether live requests queue there before each line, and yields while they do). The
   batch is running before wrk starts, is cancelled after it, and the next step waits
   until it is `cancelled` and the request records are consolidated. The order of the
   three flips from run to run; each run's ratio p99(with)/p99(alone) is its own, the
   report shows the median of the runs. The worker yields only while live requests queue
   at the deployment's concurrency limit in a gateway; 8 connections to nginx never fill
   it (16 at first), so what a batch costs here is the host's CPU it takes.

The worker stays up during the `alone` load too (as in production: it consolidates the
gateway's request records), so the comparison isolates the batch's cost.

Run alone: scripts/bench.py --batch-only [--repeat N] [--seconds S] (live load 1.5 x S).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import check, wrk
from bench.body import ChatBody
from bench.gateway import REPO, Gateway, GatewaySetup
from bench.procs import BenchError, Processes, cpu_seconds, free_port, log_tail, wait_for_http
from bench.upstream import completion_body

Figures = dict[str, float]
MASTER_KEY = "bench-master-key-batch-0123456789"
PREFIX = "bench-batch:"
SLOW_S = 0.2
CONCURRENCY = (1, 8, 32)
TARGET_RUN_S = 6.0  # each throughput batch lasts about this long at the ideal rate
LIVE_CONNECTIONS = 8
LIVE_BATCH_CONCURRENCY = 32
POLL_S = 0.05
WARMUP_LINES = 4
# Lines of the batch on the live (nginx) route: more than a worker gets through while
# the live load runs (it is cancelled after); measured rates stay well under 1,000/s.
SAME_ROUTE_LINES = 30_000
SIDES = (
    ("alone", "alone (worker idle)"),
    ("slow", "batch on the 200 ms route"),
    ("same", "batch on the live route"),
)
ROUTES = """\
routes:
  bench-live:
    strategy: priority
    cache: {{mode: "off"}}
    deployments:
      - {{name: nginx-json, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/v1"}}
  bench-slow:
    strategy: priority
    cache: {{mode: "off"}}
    deployments:
      - {{name: slow-200ms, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:@SLOW@/v1"}}
"""
_METRIC = re.compile(r"^(flywheel_[a-z_]+?)(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)


# The 200 ms upstream (a subprocess: `python -m bench.batch serve-slow PORT DELAY_MS`)


def serve_slow(port: int, delay_s: float) -> None:
    """An OpenAI-shaped chat.completion for every POST .../chat/completions, after
    `delay_s`; GET /health, and GET /stats (answered, in flight, peak in flight since the
    last /stats). Keep-alive HTTP/1.1 on asyncio streams: no framework, little CPU."""
    answer = completion_body().encode()
    stats = {"answered": 0, "in_flight": 0, "peak": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.split(b"\r\n")
                method, path = [*lines[0].split(b" "), b"", b""][:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or b"0")
                if length:
                    await reader.readexactly(length)
                status, body = b"404 Not Found", b'{"error":{"message":"not found"}}'
                if method == b"POST" and path.endswith(b"/chat/completions"):
                    stats["in_flight"] += 1
                    stats["peak"] = max(stats["peak"], stats["in_flight"])
                    try:
                        await asyncio.sleep(delay_s)
                    finally:
                        stats["in_flight"] -= 1
                    stats["answered"] += 1
                    status, body = b"200 OK", answer
                elif path == b"/health":
                    status, body = b"200 OK", b'{"status":"ok"}'
                elif path == b"/stats":
                    status, body = b"200 OK", json.dumps(stats).encode()
                    stats["peak"] = stats["in_flight"]
                writer.write(
                    b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                    % (status, len(body))
                    + body
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def start_slow(procs: Processes, tmp: Path) -> int:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "scripts"), env.get("PYTHONPATH")])
    )
    argv = [sys.executable, "-m", "bench.batch", "serve-slow", str(port), str(SLOW_S * 1000)]
    log = tmp / "slow-upstream.log"
    proc = procs.start(argv, env=env, cwd=tmp, log=log)
    wait_for_http(proc, port, "/health", timeout_s=20, log=log)
    return port


def slow_stats(port: int) -> dict[str, int]:
    status, _, text = check.get(f"http://127.0.0.1:{port}/stats")
    if status != 200:
        raise BenchError(f"batch: the 200 ms upstream's /stats answered {status}")
    stats: dict[str, int] = json.loads(text)
    return stats


# The gateway's API, as the master key


class Api:
    """Calls to the gateway on one keep-alive connection (GETs retried once on a stale
    connection); answers as JSON, anything but 2xx a BenchError."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def raw(
        self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
    ) -> tuple[int, bytes]:
        for attempt in range(2):
            conn = self._conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            headers = {"authorization": f"Bearer {MASTER_KEY}"}
            if body is not None:
                headers["content-type"] = ctype
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._conn = None
                if attempt or method != "GET":
                    raise BenchError(f"batch: {method} {path} failed: {exc!r}") from exc
                continue
            self._conn = conn
            return resp.status, data
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, data = self.raw(method, path, None if body is None else json.dumps(body).encode())
        if not 200 <= status < 300:
            raise BenchError(f"batch: {method} {path} answered {status}: {data[:1000]!r}")
        answer: dict[str, Any] = json.loads(data)
        return answer

    def upload(self, name: str, jsonl: bytes) -> str:
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n',
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="file"; filename="{name}"\r\nContent-Type: application/jsonl\r\n\r\n',
        ]
        body = "".join(parts).encode() + jsonl + f"\r\n--{boundary}--\r\n".encode()
        status, data = self.raw(
            "POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}"
        )
        if status != 200:
            raise BenchError(f"batch: uploading {name} answered {status}: {data[:1000]!r}")
        file_id: str = json.loads(data)["id"]
        return file_id

    def create(self, file_id: str) -> str:
        spec = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch_id: str = self.call("POST", "/v1/batches", spec)["id"]
        return batch_id

    def get(self, batch_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/batches/{batch_id}")

    def cancel(self, batch_id: str) -> None:
        status, data = self.raw("POST", f"/v1/batches/{batch_id}/cancel", b"{}")
        if status not in (200, 409):  # 409: it had finished already
            raise BenchError(f"batch: cancel {batch_id} answered {status}: {data[:1000]!r}")

    def metrics(self) -> dict[str, float]:
        """The gateway's flywheel_* metrics, summed over label sets."""
        status, data = self.raw("GET", "/metrics")
        if status != 200:
            raise BenchError(f"batch: /metrics answered {status}")
        out: dict[str, float] = {}
        for name, value in _METRIC.findall(data.decode(errors="replace")):
            out[name] = out.get(name, 0.0) + float(value)
        return out


def jsonl(route: str, lines: int, tag: str) -> bytes:
    """`lines` chat completion requests for `route`, each with its own prompt."""
    out = []
    for n in range(lines):
        body = {
            "model": route,
            "messages": [{"role": "user", "content": f"Say hello ({tag}.{n})"}],
            "max_tokens": 16,
        }
        line = {"custom_id": f"{tag}-{n}", "method": "POST", "url": "/v1/chat/completions"}
        out.append(json.dumps({**line, "body": body}, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def machine_cpu() -> float:
    """CPU seconds all CPUs spent busy so far (/proc/stat; idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def main_thread_nice(pid: int) -> int:
    """The nice value of a process's main thread: the worker's event loop, where its CPU
    goes (it lowers its priority at start-up, FLYWHEEL_WORKER_NICE; Linux applies nice
    per thread, so threads started before that keep theirs)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def bench_cpu() -> float:
    """CPU seconds used so far by this process, every live process below it (gateway,
    worker, nginx, Redis, the 200 ms upstream) and its children already waited for (wrk).
    The machine's busy time minus this is what others on the host used meanwhile."""
    tick = os.sysconf("SC_CLK_TCK")
    below: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        below.setdefault(int(fields[1]), []).append(pid)
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += below.get(pid, [])
    times = os.times()
    return total + times.children_user + times.children_system


# The scenario


@dataclass
class Rig:
    procs: Processes
    setup: GatewaySetup
    gateway: Gateway
    api: Api
    slow_port: int
    wrk_bin: str
    live_s: float
    progress: Callable[[str], None]
    files: dict[str, str] = field(default_factory=dict)
    worker: Any = None  # the running worker (Popen), if any
    worker_log: Path | None = None
    worker_nice: int | None = None  # its main thread's

    # Workers

    def start_worker(self, concurrency: int) -> None:
        self.stop_worker()
        env = dict(self.setup.env, FLYWHEEL_BATCH_CONCURRENCY=str(concurrency))
        self.worker_log = self.setup.tmp / f"worker-c{concurrency}.log"
        argv = [str(Path(sys.executable).parent / "arq"), "workers.main.WorkerSettings"]
        self.worker = self.procs.start(argv, env=env, cwd=self.setup.tmp, log=self.worker_log)
        # Up once it has run a small batch (imports, pools and the route warmed, too).
        started = time.perf_counter()
        batch_id = self.api.create(self.files["warmup"])
        self.wait(batch_id, {"completed"}, 90.0)
        self.worker_nice = main_thread_nice(self.worker.pid)
        self.progress(
            f"  batch  worker c={concurrency} up, warm-up batch done in "
            f"{time.perf_counter() - started:.1f} s; nice {self.worker_nice}"
        )

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.procs.stop(self.worker)
            self.worker = None

    def worker_cpu(self) -> float:
        return cpu_seconds(self.worker.pid)

    def check_alive(self) -> None:
        self.gateway.check_alive()
        if self.worker is not None and self.worker.poll() is not None:
            raise BenchError(
                f"batch: the worker exited ({self.worker.returncode}){log_tail(self.worker_log)}"
            )

    def wait(self, batch_id: str, statuses: set[str], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self.api.get(batch_id)
            if batch["status"] in statuses:
                return batch
            if batch["status"] in {"failed", "expired", "cancelled"} - statuses:
                raise BenchError(f"batch: {batch_id} ended {batch['status']}: {batch}")
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"batch: {batch_id} still {batch['status']} after {timeout_s:.0f} s: "
                    f"{batch.get('request_counts')}{log_tail(self.worker_log)}"
                )
            time.sleep(POLL_S)

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until the request records are all in the database (the consolidator, in
        the worker, is idle again): no leftover work runs into the next measurement."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.api.metrics()
            if not m.get("flywheel_records_queue_length") and not m.get("flywheel_records_pending"):
                return
            if time.monotonic() > deadline:
                self.progress(f"  batch  records still queued after {timeout_s:.0f} s; going on")
                return
            time.sleep(0.2)

    # 1. Throughput

    def throughput(self, concurrency: int) -> Figures:
        lines = round(concurrency / SLOW_S * TARGET_RUN_S)
        upstream0 = slow_stats(self.slow_port)["answered"]
        retries0 = self.api.metrics().get("flywheel_batch_line_retries", 0.0)
        batch_id = self.api.create(self.files[f"tput{concurrency}"])
        ideal = concurrency / SLOW_S
        deadline = time.monotonic() + max(60.0, 6 * lines / ideal)
        t_in: float | None = None
        t_done: float | None = None
        cpu_in = cpu_done = 0.0
        peak = 0
        samples: list[tuple[float, int]] = []
        while True:
            batch = self.api.get(batch_id)
            now = time.perf_counter()
            status = batch["status"]
            if status == "in_progress" and t_in is None:
                t_in, cpu_in = now, self.worker_cpu()
                slow_stats(self.slow_port)  # reset the peak
            if status in ("finalizing", "completed") and t_done is None:
                if t_in is None:
                    raise BenchError(f"batch: {batch_id} was never seen in_progress")
                t_done = now
                cpu_done = self.worker_cpu()
                peak = slow_stats(self.slow_port)["peak"]
            samples.append((now, int(batch["request_counts"]["completed"])))
            if status == "completed":
                break
            if status in ("failed", "expired", "cancelled", "cancelling"):
                raise BenchError(f"batch: {batch_id} ended {status}: {batch}")
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"batch: c={concurrency} did not finish: {batch}")
            time.sleep(POLL_S)
        assert t_in is not None
        assert t_done is not None
        counts = batch["request_counts"]
        if (counts["completed"], counts["failed"]) != (lines, 0):
            raise BenchError(f"batch: c={concurrency}: {counts}, expected {lines} completed")
        calls = slow_stats(self.slow_port)["answered"] - upstream0
        time.sleep(1.1)  # the worker flushes its counters every second
        retries = self.api.metrics().get("flywheel_batch_line_retries", 0.0) - retries0
        seconds = t_done - t_in
        stamped = max(1, batch["completed_at"] - batch["in_progress_at"])
        key = f"batch.tput.c{concurrency}"
        fig = {
            f"{key}.lines": lines,
            f"{key}.seconds": seconds,
            f"{key}.lines_per_s": lines / seconds,
            f"{key}.ideal_lines_per_s": ideal,
            f"{key}.pct_of_ideal": 100 * lines / seconds / ideal,
            f"{key}.stamps_lines_per_s": lines / stamped,
            f"{key}.worker_cpu_ms_per_line": 1000 * (cpu_done - cpu_in) / lines,
            f"{key}.upstream_calls": calls,
            f"{key}.upstream_peak_in_flight": peak,
            f"{key}.retries": retries,
        }
        if (mid := _mid_rate(samples, lines)) is not None:
            fig[f"{key}.mid_lines_per_s"] = mid
        self.progress(
            f"  batch  c={concurrency:<3} {lines:>5} lines in {seconds:6.2f} s  "
            f"{lines / seconds:7.1f} lines/s (ideal {ideal:.0f}, mid-run "
            f"{fig.get(f'{key}.mid_lines_per_s', 0):.1f})  upstream calls {calls}, peak in "
            f"flight {peak}, retries {retries:.0f}  worker cpu "
            f"{fig[f'{key}.worker_cpu_ms_per_line']:.2f} ms/line"
        )
        return fig

    # 2. Live traffic with and without a batch

    def live(self, side: str) -> Figures:
        self.settle()
        batch_id = None
        if side != "alone":
            batch_id = self.api.create(self.files[side])
            deadline = time.monotonic() + 120
            while True:  # running, lines done: the worker is at full speed
                batch = self.wait(batch_id, {"in_progress", "completed"}, 120)
                if batch["request_counts"]["completed"] > 0 or batch["status"] == "completed":
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"batch: {batch_id} started no line: {batch}")
                time.sleep(POLL_S)
        before = self._snapshot(batch_id)
        body = ChatBody("bench-live", stream=False, unique=True)
        res = wrk.run(
            self.wrk_bin,
            f"{self.gateway.url}/v1/chat/completions",
            body,
            connections=LIVE_CONNECTIONS,
            seconds=self.live_s,
            authorization=f"Bearer {MASTER_KEY}",
        )
        after = self._snapshot(batch_id)
        self.check_alive()
        elapsed = after["t"] - before["t"]
        key = f"batch.live.{side}"
        fig: Figures = {f"{key}.{k}": v for k, v in res.figures().items()}
        fig[f"{key}.gateway_cpu_ms_per_req"] = (
            1000 * (after["gateway_cpu"] - before["gateway_cpu"]) / max(1, res.requests)
        )
        fig[f"{key}.worker_cpu_pct"] = 100 * (after["worker_cpu"] - before["worker_cpu"]) / elapsed
        busy = after["machine"] - before["machine"]
        fig[f"{key}.machine_busy_pct"] = 100 * busy / elapsed / (os.cpu_count() or 1)
        # Others on the host (tests, builds): the noise, in % of one CPU.
        fig[f"{key}.others_cpu_pct"] = max(
            0.0, 100 * (busy - after["ours"] + before["ours"]) / elapsed
        )
        fig[f"{key}.records_lag_s"] = after["lag_s"]
        if batch_id is not None:
            lines = after["completed"] - before["completed"]
            fig[f"{key}.batch_lines_per_s"] = lines / elapsed
            fig[f"{key}.batch_outlasted"] = float(after["status"] == "in_progress")
            if after["status"] != "in_progress":
                self.progress(
                    f"  batch  WARNING: the batch ended before the live load did ({side})"
                )
            self.api.cancel(batch_id)
            self.wait(batch_id, {"cancelled", "completed"}, 180)
            time.sleep(1.1)  # the worker flushes its counters (yields) every second
            metrics = self.api.metrics()
            fig[f"{key}.yields"] = metrics.get("flywheel_batch_yields", 0.0) - before["yields"]
            fig[f"{key}.yield_s"] = (
                metrics.get("flywheel_batch_yield_seconds", 0.0) - before["yield_s"]
            )
        self.progress(
            f"  batch  live c={LIVE_CONNECTIONS} {side:<6} {res.rps:7.0f} req/s  "
            f"p50 {res.p50_ms:6.2f}  p90 {res.p90_ms:6.2f}  p99 {res.p99_ms:6.2f} ms  "
            f"errors {res.errors}  machine busy {fig[f'{key}.machine_busy_pct']:.0f}% (others "
            f"{fig[f'{key}.others_cpu_pct']:.0f}% of a CPU)  "
            f"worker {fig[f'{key}.worker_cpu_pct']:.0f}% of a CPU"
            + (
                f"  batch {fig[f'{key}.batch_lines_per_s']:.0f} lines/s, "
                f"yields {fig[f'{key}.yields']:.0f}"
                if batch_id
                else ""
            )
        )
        return fig

    def _snapshot(self, batch_id: str | None) -> dict[str, Any]:
        m = self.api.metrics()
        snap: dict[str, Any] = {
            "yields": m.get("flywheel_batch_yields", 0.0),
            "yield_s": m.get("flywheel_batch_yield_seconds", 0.0),
            "lag_s": m.get("flywheel_records_lag_seconds", 0.0),
            "completed": 0,
            "status": None,
        }
        if batch_id is not None:
            batch = self.api.get(batch_id)
            snap["completed"] = int(batch["request_counts"]["completed"])
            snap["status"] = batch["status"]
        snap.update(
            t=time.perf_counter(),
            gateway_cpu=self.gateway.cpu_seconds(),
            worker_cpu=self.worker_cpu(),
            machine=machine_cpu(),
            ours=bench_cpu(),
        )
        return snap


def _mid_rate(samples: list[tuple[float, int]], lines: int) -> float | None:
    """Lines/s between the first poll showing a quarter of the lines done and the first
    showing three quarters: the steady rate, start and end ramps left out."""
    first = next(((t, n) for t, n in samples if n >= lines / 4), None)
    last = next(((t, n) for t, n in samples if n >= 3 * lines / 4), None)
    if first is None or last is None or last[0] <= first[0] or last[1] <= first[1]:
        return None
    return (last[1] - first[1]) / (last[0] - first[0])


def live_lines(live_s: float) -> int:
    """Lines of the batch on the 200 ms route: enough for the live load, the time the
    batch takes to start, and margin, at the ideal rate."""
    return round(LIVE_BATCH_CONCURRENCY / SLOW_S * (live_s + 20))


def run_batch(
    procs: Processes,
    tmp: Path,
    nginx_port: int,
    redis_url: str,
    wrk_bin: str,
    repeat: int,
    live_s: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The whole scenario `repeat` times; {"runs": [figures...], "median": figures, ...}."""
    tmp.mkdir(parents=True, exist_ok=True)
    slow_port = start_slow(procs, tmp)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = (
        ("FLYWHEEL_MASTER_KEY", MASTER_KEY),
        ("FLYWHEEL_REDIS_PREFIX", PREFIX),
        ("FLYWHEEL_BATCH_POLL_S", "0.2"),
        ("FLYWHEEL_CYCLE_INTERVAL_S", "3600"),
        ("PYTHONPATH", pythonpath),
    )
    routes = ROUTES.replace("@SLOW@", str(slow_port))
    setup = GatewaySetup(tmp, nginx_port, redis_url, routes_template=routes, extra_env=env)
    setup.prepare()
    gateway, _ = setup.start(procs)
    api = Api(gateway.port)
    rig = Rig(procs, setup, gateway, api, slow_port, wrk_bin, live_s, progress)
    runs: list[Figures] = []
    try:
        url = f"{gateway.url}/v1/chat/completions"
        for route in ("bench-live", "bench-slow"):
            answer = check.verify(
                url, ChatBody(route, False, True), authorization=f"Bearer {MASTER_KEY}"
            )
            progress(f"  batch  {route:<10} answers OK ({answer})")
        uploads = {
            "warmup": ("bench-slow", WARMUP_LINES),
            **{f"tput{c}": ("bench-slow", round(c / SLOW_S * TARGET_RUN_S)) for c in CONCURRENCY},
            "slow": ("bench-slow", live_lines(live_s)),
            "same": ("bench-live", SAME_ROUTE_LINES),
        }
        for name, (route, lines) in uploads.items():
            started = time.perf_counter()
            rig.files[name] = api.upload(f"{name}.jsonl", jsonl(route, lines, name))
            progress(
                f"  batch  uploaded {name} ({lines} lines on {route}) in "
                f"{time.perf_counter() - started:.1f} s"
            )
        for i in range(repeat):
            progress(f"batch run {i + 1}/{repeat}")
            fig: Figures = {}
            for c in CONCURRENCY:
                rig.start_worker(c)
                fig.update(rig.throughput(c))
            # The c=32 worker stays for the live comparison; its load is JSON at c=8.
            wrk.run(
                wrk_bin,
                url,
                ChatBody("bench-live", False, True),
                connections=LIVE_CONNECTIONS,
                seconds=1.0,
                authorization=f"Bearer {MASTER_KEY}",
            )
            order = [s for s, _ in SIDES]
            for side in order if i % 2 == 0 else order[::-1]:
                fig.update(rig.live(side))
            rig.stop_worker()
            add_ratios(fig)
            runs.append(fig)
    finally:
        rig.stop_worker()
        api.close()
        procs.stop(gateway.proc)
    keys = sorted({k for r in runs for k in r})
    med = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    return {
        "runs": runs,
        "median": med,
        "meta": {
            "upstream_latency_s": SLOW_S,
            "concurrency": list(CONCURRENCY),
            "live_connections": LIVE_CONNECTIONS,
            "live_seconds": live_s,
            "live_batch_concurrency": LIVE_BATCH_CONCURRENCY,
            "repeat": repeat,
            "worker_nice": rig.worker_nice,
        },
    }


def add_ratios(fig: Figures) -> None:
    """p50/p99 with a batch over p99 alone, within one run."""
    for side, _ in SIDES[1:]:
        for p in ("p50", "p99"):
            alone = fig.get(f"batch.live.alone.{p}_ms")
            with_batch = fig.get(f"batch.live.{side}.{p}_ms")
            if alone and with_batch is not None:
                fig[f"batch.live.{side}.{p}_ratio"] = with_batch / alone


# The report


def _n(fig: Figures, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(fig[key]) if key in fig else "-"


def render(result: dict[str, Any]) -> str:
    runs: Sequence[Figures] = result["runs"]
    med: Figures = result["median"]
    meta = result["meta"]
    of = f"median of {len(runs)} runs" if len(runs) > 1 else "1 run"
    lines = [
        "",
        f"Batch API: throughput vs FLYWHEEL_BATCH_CONCURRENCY, upstream answering in "
        f"{meta['upstream_latency_s'] * 1000:.0f} ms ({of})",
        f"{'conc':>5} | {'lines':>5} | {'seconds':>7} | {'lines/s':>7} | {'ideal':>5} | "
        f"{'% ideal':>7} | {'mid-run/s':>9} | {'stamps/s':>8} | {'worker cpu/line':>15} | "
        f"{'upstream peak':>13} | {'retries':>7}",
    ]
    for c in meta["concurrency"]:
        k = f"batch.tput.c{c}"
        lines.append(
            f"{c:>5} | {_n(med, k + '.lines', '{:.0f}'):>5} | {_n(med, k + '.seconds'):>7} | "
            f"{_n(med, k + '.lines_per_s', '{:.1f}'):>7} | "
            f"{_n(med, k + '.ideal_lines_per_s', '{:.0f}'):>5} | "
            f"{_n(med, k + '.pct_of_ideal', '{:.0f}%'):>7} | "
            f"{_n(med, k + '.mid_lines_per_s', '{:.1f}'):>9} | "
            f"{_n(med, k + '.stamps_lines_per_s', '{:.1f}'):>8} | "
            f"{_n(med, k + '.worker_cpu_ms_per_line', '{:.2f} ms'):>15} | "
            f"{_n(med, k + '.upstream_peak_in_flight', '{:.0f}'):>13} | "
            f"{_n(med, k + '.retries', '{:.0f}'):>7}"
        )
    if len(runs) > 1:
        for c in meta["concurrency"]:
            each = ", ".join(_n(r, f"batch.tput.c{c}.lines_per_s", "{:.1f}") for r in runs)
            lines.append(f"  c={c} lines/s per run: {each}")
    lines += [
        "seconds: first poll (every 50 ms) seeing in_progress -> first seeing finalizing;",
        "mid-run: from 1/4 to 3/4 of the lines done; stamps: the API's whole-second",
        "in_progress_at/completed_at; upstream peak: most lines in flight at the upstream;",
        "retries: line attempts the worker retried. Every line completed, one upstream call each.",
        "Above 16 lines in flight a new worker ramps up: its limiter for the deployment starts",
        "at the route's concurrency.initial (16) and grows by about one per 16 answers.",
        "",
        f"Live JSON through the gateway to nginx (wrk c={meta['live_connections']}, "
        f"{meta['live_seconds']:g} s) while a batch runs (c={meta['live_batch_concurrency']}) "
        f"— ms ({of})",
        f"{'side':<26} | {'req/s':>7} {'p50':>6} {'p90':>6} {'p99':>7} {'err':>4} | "
        f"{'p99 x':>5} {'p50 x':>5} | {'gw cpu/req':>10} | {'worker':>6} | {'busy':>4} | "
        f"{'others':>6} | {'batch/s':>7} | {'yields':>6}",
    ]
    for side, title in SIDES:
        k = f"batch.live.{side}"
        lines.append(
            f"{title:<26} | {_n(med, k + '.rps', '{:.0f}'):>7} {_n(med, k + '.p50_ms'):>6} "
            f"{_n(med, k + '.p90_ms'):>6} {_n(med, k + '.p99_ms'):>7} "
            f"{_n(med, k + '.errors', '{:.0f}'):>4} | "
            f"{_n(med, k + '.p99_ratio'):>5} {_n(med, k + '.p50_ratio'):>5} | "
            f"{_n(med, k + '.gateway_cpu_ms_per_req', '{:.3f}'):>10} | "
            f"{_n(med, k + '.worker_cpu_pct', '{:.0f}%'):>6} | "
            f"{_n(med, k + '.machine_busy_pct', '{:.0f}%'):>4} | "
            f"{_n(med, k + '.others_cpu_pct', '{:.0f}%'):>6} | "
            f"{_n(med, k + '.batch_lines_per_s', '{:.0f}'):>7} | "
            f"{_n(med, k + '.yields', '{:.0f}'):>6}"
        )
    if len(runs) > 1:
        for side, _ in SIDES:
            k = f"batch.live.{side}"
            each = ", ".join(
                f"{_n(r, k + '.p99_ms')} ({_n(r, k + '.rps', '{:.0f}')}/s, "
                f"{_n(r, k + '.others_cpu_pct', '{:.0f}%')})"
                for r in runs
            )
            lines.append(f"  {side:<5} p99 ms (req/s, others) per run: {each}")
    lines += [
        "p99 x / p50 x: the run's p99 (p50) over the same run's alone p99 (p50), median of runs;",
        "worker: its CPU as a share of one CPU during the load; busy: all CPUs; others: CPU the",
        "bench's processes did not use (other work on the host: noise), in % of one CPU;",
        "batch/s: the batch's lines done during the load; yields: lines that waited for queued",
        "live requests (a yield needs live requests queued at the deployment's concurrency",
        "limit, 16 at first: 8 connections never queue, so 0 is expected here; the cost left",
        "is the worker's CPU on a shared host).",
    ]
    if meta.get("worker_nice") is not None:
        lines.append(
            f"The worker's event loop ran at nice {meta['worker_nice']} (FLYWHEEL_WORKER_NICE)."
        )
    if "cpu_steal_pct" in meta:
        lines.append(
            f"CPU stolen by the host during the batch scenario: {meta['cpu_steal_pct']:.1f}%"
        )
    outlasted = [
        r.get(f"batch.live.{s}.batch_outlasted", 1.0) for r in runs for s in ("slow", "same")
    ]
    if min(outlasted, default=1.0) < 1:
        lines.append("WARNING: a batch finished before its live load did; its row understates.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve-slow":
        serve_slow(int(sys.argv[2]), float(sys.argv[3]) / 1000)
    else:
        sys.exit("usage: python -m bench.batch serve-slow PORT DELAY_MS")
