"""The soak's processes: nginx (the fake upstream, bench's, plus a flaky location), Redis,
the database, one gateway and one arq worker, all on loopback.

Redis: the local server on 127.0.0.1:6379, database 14 (the tests use 15), when it
answers; else a private redis-server on a unix socket (bench's). Every key the run writes
carries a prefix of its own and is deleted at the end (with arq's job keys, which arq does
not prefix: DB 14 is the soak's own). Database: a fresh PostgreSQL database on
127.0.0.1:5432 when the server answers (dropped at the end), else SQLite in the temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
from bench.check import get
from bench.gateway import Gateway, GatewaySetup
from bench.procs import BenchError, Processes, log_tail
from bench.upstream import start_nginx, start_redis

LOCAL_REDIS = ("127.0.0.1", 6379)
REDIS_DB = 14
LOCAL_POSTGRES = ("127.0.0.1", 5432)
PG_ADMIN = "postgresql://127.0.0.1:5432/postgres"
WORKER_START_TIMEOUT_S = 60.0

# A deployment that fails a quarter of its calls: nginx's $request_id is 32 random hex
# digits, so its last one is 0-3 for 4 calls in 16. The 500 is OpenAI-shaped, as a
# provider's own failure would be.
FLAKY_ERROR = {"message": "injected failure", "type": "server_error", "param": None, "code": None}
FLAKY_LOCATION = """
        location = /flaky/v1/chat/completions {
            default_type application/json;
            if ($request_id ~ "[0-3]$") {
                return 500 '@ERROR@';
            }
            return 200 '@JSON_BODY@';
        }
""".replace("@ERROR@", json.dumps({"error": FLAKY_ERROR}, separators=(",", ":")))
# Three routes over nginx: JSON and SSE with the response cache on (the mix sends each
# both repeated prompts, answered from the cache, and unique ones, which miss and are
# written to it), and the flaky deployment with the cache off and one retry, so about
# 1/16 of its requests fail twice and reach the client as a 502.
ROUTES = """\
routes:
  soak-json:
    strategy: priority
    cache: {{mode: "on"}}
    deployments:
      - {{name: nginx-json, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/v1"}}
  soak-stream:
    strategy: priority
    cache: {{mode: "on"}}
    deployments:
      - {{name: nginx-stream, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/stream/v1"}}
  soak-flaky:
    strategy: priority
    cache: {{mode: "off"}}
    retries: 1
    deployments:
      - {{name: nginx-flaky, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{port}/flaky/v1"}}
"""
# Settings that would send anything off this machine (tracing, LangSmith, webhooks, an
# LLM judge or optimizer, provider keys that add built-in example routes): never
# inherited from the caller's environment, so every byte the run sends goes to 127.0.0.1.
OUTBOUND_PREFIXES = ("OTEL_", "LANGSMITH_", "LANGCHAIN_")
OUTBOUND_NAMES = (
    "FLYWHEEL_ALERT_WEBHOOK_URL",
    "FLYWHEEL_JUDGE_ROUTE",
    "FLYWHEEL_OPTIMIZER_ROUTE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


def tcp_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def outbound(name: str) -> bool:
    upper = name.upper()
    return (
        upper.startswith(OUTBOUND_PREFIXES) or upper in OUTBOUND_NAMES or upper.endswith("_API_KEY")
    )


@dataclass(frozen=True)
class SoakSetup(GatewaySetup):
    """bench's gateway setup, with the caller's outbound settings left out (the worker
    runs with the same environment)."""

    @property
    def env(self) -> dict[str, str]:
        own = dict(self.extra_env)
        return {k: v for k, v in super().env.items() if k in own or not outbound(k)}


# Backends


def redis_backend(procs: Processes, tmp: Path, mode: str) -> tuple[str, str, bool]:
    """(REDIS_URL, description, shared): the local server when it answers (mode auto or
    local), else a private redis-server (auto or embedded), gone with its process."""
    if mode != "embedded" and tcp_open(*LOCAL_REDIS):
        url = f"redis://{LOCAL_REDIS[0]}:{LOCAL_REDIS[1]}/{REDIS_DB}"
        import redis

        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(url, socket_timeout=2).ping()
            return url, f"local Redis {LOCAL_REDIS[0]}:{LOCAL_REDIS[1]} DB {REDIS_DB}", True
    if mode == "local":
        raise BenchError(f"no Redis answers on {LOCAL_REDIS[0]}:{LOCAL_REDIS[1]}")
    return start_redis(procs, tmp), "private redis-server (unix socket)", False


def delete_keys(url: str, prefix: str, progress: Callable[[str], None]) -> None:
    """Delete the run's keys from the shared server (and arq's: DB 14 is the soak's own)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        keys += list(client.scan_iter(match="arq:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    except redis.RedisError as exc:
        progress(f"soak: could not delete the keys {prefix}* from {url}: {exc}")
    finally:
        client.close()


def database_backend(
    tmp: Path, mode: str, pg_admin: str, stack: ExitStack, progress: Callable[[str], None]
) -> tuple[str, str]:
    """(DATABASE_URL, description): a fresh PostgreSQL database, dropped by `stack`, when
    the local server answers (mode auto or postgres), else SQLite (auto or sqlite)."""
    if mode != "sqlite" and tcp_open(*LOCAL_POSTGRES):
        import asyncpg

        name = f"flywheel_soak_{uuid.uuid4().hex[:10]}"

        async def admin(sql: str) -> None:
            conn = await asyncpg.connect(pg_admin, timeout=5)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        def drop() -> None:
            try:
                asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except (OSError, asyncpg.PostgresError) as exc:
                progress(f"soak: could not drop the PostgreSQL database {name}: {exc}")

        try:
            asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        except (OSError, asyncpg.PostgresError) as exc:
            if mode == "postgres":
                raise BenchError(f"cannot create a PostgreSQL database: {exc}") from exc
            progress(f"soak: PostgreSQL answers but no database could be made ({exc}); SQLite")
        else:
            stack.callback(drop)
            host, port = LOCAL_POSTGRES
            base = pg_admin.rsplit("/", 1)[0]
            return f"{base}/{name}", f"PostgreSQL {host}:{port}, database {name} (dropped after)"
    if mode == "postgres":
        raise BenchError(f"no PostgreSQL answers on {LOCAL_POSTGRES[0]}:{LOCAL_POSTGRES[1]}")
    return f"sqlite+aiosqlite:///{tmp / 'soak.db'}", "SQLite (temp dir)"


# Processes


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (uvicorn --workers N, a
    supervisor), in MB; 0 when it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / (1024 * 1024)


@dataclass
class Rig:
    gateway: Gateway
    worker: subprocess.Popen[bytes]
    worker_log: Path
    redis: str  # descriptions, for the report
    database: str
    database_url: str

    def check_alive(self) -> str | None:
        """Why the run cannot go on (a process exited), or None."""
        if self.gateway.proc.poll() is not None:
            return (
                f"the gateway exited ({self.gateway.proc.returncode}){log_tail(self.gateway.log)}"
            )
        if self.worker.poll() is not None:
            return f"the worker exited ({self.worker.returncode}){log_tail(self.worker_log)}"
        return None


def start(
    procs: Processes,
    stack: ExitStack,
    tmp: Path,
    nginx: str,
    *,
    redis_mode: str,
    db_mode: str,
    pg_admin: str,
    extra_env: dict[str, str],
    progress: Callable[[str], None],
) -> Rig:
    """Start everything; `stack` undoes what lives outside `tmp` (keys, a database)."""
    _, nginx_port = start_nginx(procs, tmp / "nginx", nginx, FLAKY_LOCATION)
    redis_url, redis_label, shared = redis_backend(procs, tmp, redis_mode)
    prefix = f"soak:{uuid.uuid4().hex[:8]}:"
    if shared:  # registered before anything writes: keys go even when the start fails
        stack.callback(delete_keys, redis_url, prefix, progress)
    db_url, db_label = database_backend(tmp, db_mode, pg_admin, stack, progress)
    # Pinned whatever the caller's environment says: no key needed (dev serves unknown
    # keys as anonymous), the run's own Redis prefix and database.
    env = {
        "FLYWHEEL_ENV": "dev",
        "FLYWHEEL_AUTH": "optional",
        **extra_env,
        "FLYWHEEL_REDIS_PREFIX": prefix,
        "DATABASE_URL": db_url,
    }
    setup = SoakSetup(tmp / "gateway", nginx_port, redis_url, ROUTES, tuple(env.items()))
    progress(f"soak: Redis: {redis_label}, prefix {prefix}; database: {db_label}")
    setup.prepare()  # migrations
    gateway, cold = setup.start(procs)
    progress(f"soak: gateway up on {gateway.url} in {cold:.1f} s")
    worker_log = setup.tmp / "worker.log"
    argv = [str(Path(sys.executable).parent / "arq"), "workers.main.WorkerSettings"]
    worker = procs.start(argv, env=setup.env, cwd=setup.tmp, log=worker_log)
    rig = Rig(gateway, worker, worker_log, redis_label, db_label, db_url)
    wait_for_worker(rig)
    progress("soak: worker up (heartbeat seen by the gateway)")
    return rig


def wait_for_worker(rig: Rig) -> None:
    """Until /health/detailed reports a live worker (its first heartbeat)."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (why := rig.check_alive()) is not None:
            raise BenchError(why)
        status, _, text = get(f"{rig.gateway.url}/health/detailed")
        if status == 200 and json.loads(text)["workers"]["status"] == "ok":
            return
        time.sleep(0.5)
    raise BenchError(
        f"no worker heartbeat after {WORKER_START_TIMEOUT_S:.0f} s{log_tail(rig.worker_log)}"
    )


async def request_rows(database_url: str) -> int:
    """Rows in the database's `requests` table (the consolidated request records)."""
    from sqlalchemy import func, select

    from app.config import normalise_database_url
    from app.store.db import make_engine
    from app.store.schema import RequestRow

    engine = make_engine(normalise_database_url(database_url))
    try:
        async with engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(RequestRow))).scalar_one()
            )
    finally:
        await engine.dispose()


def description() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
