"""The gateway under test: one uvicorn worker over a temp routes file and a temp SQLite.

Cold start is the time from spawning uvicorn to the first 200 from GET /health.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import (
    BenchError,
    Processes,
    cpu_seconds,
    free_port,
    log_tail,
    rss_mb,
    wait_for_http,
)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROUTES = """\
routes:
  bench-json:
    strategy: priority
    deployments:
      - {{name: nginx-json, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/v1"}}
  bench-stream:
    strategy: priority
    deployments:
      - {{name: nginx-stream, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/stream/v1"}}
"""
START_TIMEOUT_S = 60.0
# The per-process HTTP limits (slowapi) stay on, as in production, since checking them is
# part of every request's cost; but the bench sends thousands of requests a second from
# one address, past the defaults (60,000 a minute per address), so they are set where
# they never refuse.
UNREACHABLE_LIMIT = "100000000/minute"
HTTP_LIMITS_ENV = (
    ("FLYWHEEL_HTTP_LIMITS", "true"),
    ("FLYWHEEL_HTTP_LIMIT_IP", UNREACHABLE_LIMIT),
    ("FLYWHEEL_HTTP_LIMIT_CHAT", UNREACHABLE_LIMIT),
)


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the gateway exited ({self.proc.returncode}){log_tail(self.log)}")


def uvicorn_argv(app: str, port: int) -> list[str]:
    """One uvicorn worker as production runs it (uvloop, httptools, no access log)."""
    return [
        str(BIN / "uvicorn"),
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
    ]


def start_reference(procs: Processes, tmp: Path, upstream_port: int) -> str:
    """The calibration pass-through (bench/reference.py) on its own port; its base URL."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, BENCH_UPSTREAM=f"http://127.0.0.1:{upstream_port}/v1/chat/completions")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "scripts"), env.get("PYTHONPATH")])
    )
    log = tmp / "reference.log"
    since = time.perf_counter()
    proc = procs.start(uvicorn_argv("bench.reference:app", port), env=env, cwd=tmp, log=log)
    wait_for_http(proc, port, "/health", timeout_s=START_TIMEOUT_S, log=log, since=since)
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class GatewaySetup:
    """Everything one gateway process needs; `prepare` writes the files and migrates."""

    tmp: Path
    upstream_port: int
    # A real Redis, as in production: request records are shipped to it during the load.
    redis_url: str
    routes_template: str = ROUTES
    extra_env: tuple[tuple[str, str], ...] = ()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            FLYWHEEL_CONFIG=str(self.tmp / "routes.yaml"),
            FLYWHEEL_VAR_DIR=str(self.tmp / "var"),
            DATABASE_URL=f"sqlite+aiosqlite:///{self.tmp / 'bench.db'}",
        )
        env.update(HTTP_LIMITS_ENV)
        env.update(self.extra_env)
        return env

    @property
    def log(self) -> Path:
        return self.tmp / "gateway.log"

    def prepare(self) -> None:
        (self.tmp / "var").mkdir(parents=True, exist_ok=True)
        (self.tmp / "routes.yaml").write_text(self.routes_template.format(port=self.upstream_port))
        flywheel = BIN / "flywheel"
        if not flywheel.exists():
            raise BenchError(f"{flywheel} is missing; run `make dev` first")
        done = subprocess.run(
            [str(flywheel), "migrate"],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"`flywheel migrate` failed ({done.returncode}):\n{done.stderr}")

    def start(self, procs: Processes) -> tuple[Gateway, float]:
        """Spawn uvicorn and wait for /health; the gateway and its cold start in seconds."""
        port = free_port()
        argv = uvicorn_argv("app.main:app", port)
        # The gateway's cwd is the temp dir, so a developer's .env or flywheel.yaml in
        # the repository does not leak into the measurement.
        since = time.perf_counter()
        proc = procs.start(argv, env=self.env, cwd=self.tmp, log=self.log)
        cold = wait_for_http(
            proc, port, "/health", timeout_s=START_TIMEOUT_S, log=self.log, since=since
        )
        return Gateway(proc, port, self.log), cold


def start_measured(
    procs: Processes, setup: GatewaySetup, cold_starts: int
) -> tuple[Gateway, float]:
    """Start the gateway `cold_starts` times, keep the last; the median cold start."""
    times: list[float] = []
    gateway: Gateway | None = None
    for _ in range(max(1, cold_starts)):
        if gateway is not None:
            procs.stop(gateway.proc)
        gateway, cold = setup.start(procs)
        times.append(cold)
    assert gateway is not None
    return gateway, statistics.median(times)
