"""Snapshots against the real Redis and database: create, list, retention, restore into
a fresh installation (proved with a served gateway's L2 hit and learned weights), bad
files refused with Redis untouched, breaker cooldowns shared, and the CLI."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.main import create_app
from app.routing.router import Router
from app.routing.weights import breakers_key, publish_breakers, seed_breakers, weights_key
from app.store.db import make_engine
from app.store.schema import Snapshot
from app.store.snapshot_file import ChecksumMismatch, CorruptSnapshot, SnapshotNotFound
from app.store.snapshots import Snapshots
from tests.conftest import Served, openai_route, routes_for
from tests.fakes.server import FakeServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The database, with an empty snapshot index before and after each test."""
    engine = make_engine(Settings(_env_file=None, database_url=database_url).database_dsn)  # type: ignore[call-arg]
    async with engine.begin() as conn:
        await conn.execute(delete(Snapshot))
    yield engine
    async with engine.begin() as conn:
        await conn.execute(delete(Snapshot))
    await engine.dispose()


@pytest.fixture
def prefix(key_prefix: str) -> Callable[[], str]:
    """A fresh installation's prefix (under the session's, so its keys are cleaned up)."""
    return lambda: f"{key_prefix}snap{uuid.uuid4().hex[:6]}:"


async def state_of(redis: Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under `prefix` with its value, to show a refused restore changed nothing."""
    out: dict[bytes, Any] = {}
    async for key in redis.scan_iter(match=prefix + "*"):
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await redis.get(key)
    return out


async def test_create_list_and_retention(
    make_settings: Callable[..., Settings],
    redis: Redis,
    engine: AsyncEngine,
    prefix: Callable[[], str],
    tmp_path: Path,
) -> None:
    p = prefix()
    settings = make_settings(flywheel_redis_prefix=p, flywheel_snapshot_dir=tmp_path)
    await redis.hset(weights_key(p, "chat"), mapping={"a": "0.3", "b": "0.7"})
    store = Snapshots.from_settings(settings, redis, engine)
    assert store.keep == 10
    first = await store.create()
    listed = await store.listing()
    assert [s.id for s in listed] == [first.id]
    assert listed[0].size_bytes == Path(first.path).stat().st_size > 0
    assert listed[0].checksum == first.checksum
    assert listed[0].checksum.startswith("sha256:")
    assert listed[0].counts == {"routing_weights": 1, "breakers": 0, "cycle": 0, "cache": 0}
    made = [first.id] + [(await store.create()).id for _ in range(11)]
    kept = [s.id for s in await store.listing()]
    assert kept == sorted(made, reverse=True)[:10]
    files = sorted(p.name.removesuffix(".json.gz") for p in tmp_path.glob("*.json.gz"))
    assert files == sorted(kept)
    assert not list(tmp_path.glob(".*.tmp"))


async def test_restore_into_a_fresh_redis_brings_back_weights_and_cache(
    make_settings: Callable[..., Settings],
    openai_upstream: FakeServer,
    redis: Redis,
    engine: AsyncEngine,
    prefix: Callable[[], str],
    tmp_path: Path,
) -> None:
    old, fresh = prefix(), prefix()
    marker = uuid.uuid4().hex
    body = {"model": "cached", "messages": [{"role": "user", "content": f"hi {marker}"}]}
    routes = routes_for(
        cached=openai_route(openai_upstream.url) | {"cache": {"mode": "on", "ttl_s": 600}},
        ad={
            "strategy": "adaptive",
            "deployments": [
                {"name": "x", "provider": "mock", "model": "mock-x"},
                {"name": "y", "provider": "mock", "model": "mock-y"},
            ],
        },
    )

    def settings(p: str) -> Settings:
        return make_settings(
            flywheel_redis_prefix=p,
            flywheel_snapshot_dir=tmp_path,
            openai_api_key="sk-test-secret-0123456789",
        )

    await redis.hset(weights_key(old, "ad"), mapping={"x": "0.2", "y": "0.8"})
    async with Served(create_app(settings(old), routes)) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            first = await client.post("/v1/chat/completions", json=body)
        assert first.headers["x-flywheel-cache"] == "miss"
    # The gateway's stop wrote the L2 entry and its hit count.
    info = await Snapshots.from_settings(settings(old), redis, engine).create()
    assert info.counts["cache"] >= 1
    assert info.counts["routing_weights"] == 1

    assert await state_of(redis, fresh) == {}
    restored = await Snapshots.from_settings(settings(fresh), redis, engine).restore(info.id)
    assert restored["restored"]["routing_weights"] == 1
    assert restored["restored"]["cache"] >= 1
    entries = [k async for k in redis.scan_iter(match=fresh + "cache:v1:*")]
    assert len(entries) == restored["restored"]["cache"]
    ttl = await redis.pttl(entries[0])
    assert 0 < ttl <= 600_000  # the original expiry, not a new one

    seen_before = sum(marker in json.dumps(s.body) for s in openai_upstream.seen)
    async with Served(create_app(settings(fresh), routes)) as gw:
        for _ in range(50):  # the weights refresh runs at start
            if gw.state.router.learned_weights.get("ad"):
                break
            await asyncio.sleep(0.02)
        assert gw.state.router.learned_weights["ad"] == {"x": 0.2, "y": 0.8}
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            again = await client.post("/v1/chat/completions", json=body)
    assert again.status_code == 200
    assert again.headers["x-flywheel-cache"] == "hit-l2"
    assert again.json()["choices"] == first.json()["choices"]
    assert sum(marker in json.dumps(s.body) for s in openai_upstream.seen) == seen_before


async def test_bad_files_are_refused_and_redis_is_unchanged(
    redis: Redis, engine: AsyncEngine, prefix: Callable[[], str], tmp_path: Path
) -> None:
    source, target = prefix(), prefix()
    await redis.hset(weights_key(source, "chat"), mapping={"a": "1"})
    info = await Snapshots(redis, engine, directory=tmp_path, prefix=source).create()
    await redis.hset(weights_key(target, "chat"), mapping={"a": "0.5", "b": "0.5"})
    await redis.set(target + "cycle:note", "keep me")
    before = await state_of(redis, target)
    store = Snapshots(redis, engine, directory=tmp_path, prefix=target)
    raw = Path(info.path).read_bytes()

    truncated = tmp_path / "truncated.json.gz"
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(CorruptSnapshot, match="truncated"):
        await store.restore(str(truncated), allow_path=True)
    tampered = tmp_path / "tampered.json.gz"
    doc = orjson.loads(gzip.decompress(raw))
    doc["sections"]["routing_weights"][0]["value"] = {"a": "0", "b": "1"}
    tampered.write_bytes(gzip.compress(orjson.dumps(doc)))
    with pytest.raises(ChecksumMismatch, match="checksum"):
        await store.restore(str(tampered), allow_path=True)
    with pytest.raises(SnapshotNotFound):  # ids only, unless the caller allows paths
        await store.restore(str(tampered))
    Path(info.path).write_bytes(raw[:100])  # the indexed file itself, damaged in place
    with pytest.raises(CorruptSnapshot):
        await store.restore(info.id)
    assert await state_of(redis, target) == before


async def test_cycle_keys_of_every_type_round_trip(
    redis: Redis, engine: AsyncEngine, prefix: Callable[[], str], tmp_path: Path
) -> None:
    """The generic section the virtuous cycle's state (`{prefix}cycle:`) lands in."""
    old, fresh = prefix(), prefix()
    await redis.set(old + "cycle:bin", b"\x00\xffraw", px=120_000)
    await redis.hset(old + "cycle:experiment:1", mapping={"status": "running", "n": "12"})
    await redis.rpush(old + "cycle:queue", "b", "a", "b")
    await redis.sadd(old + "cycle:set", "x", "y")
    await redis.zadd(old + "cycle:scores", {"v1": 0.91, "v2": 0.87})
    await redis.set(old + "cycle:expired", "x", px=1)
    await asyncio.sleep(0.01)
    info = await Snapshots(redis, engine, directory=tmp_path, prefix=old).create()
    assert info.counts["cycle"] == 5
    result = await Snapshots(redis, engine, directory=tmp_path, prefix=fresh).restore(info.id)
    assert result["restored"]["cycle"] == 5
    assert await redis.get(fresh + "cycle:bin") == b"\x00\xffraw"
    assert 100_000 < await redis.pttl(fresh + "cycle:bin") <= 120_000
    assert await redis.pttl(fresh + "cycle:set") == -1
    assert await redis.hgetall(fresh + "cycle:experiment:1") == {b"status": b"running", b"n": b"12"}
    assert await redis.lrange(fresh + "cycle:queue", 0, -1) == [b"b", b"a", b"b"]
    assert await redis.smembers(fresh + "cycle:set") == {b"x", b"y"}
    assert await redis.zrange(fresh + "cycle:scores", 0, -1, withscores=True) == [
        (b"v2", 0.87),
        (b"v1", 0.91),
    ]
    # Restoring again replaces the keys it holds rather than appending to them.
    await Snapshots(redis, engine, directory=tmp_path, prefix=fresh).restore(info.id)
    assert await redis.lrange(fresh + "cycle:queue", 0, -1) == [b"b", b"a", b"b"]


async def test_breaker_cooldowns_are_shared_and_snapshotted(
    make_settings: Callable[..., Settings],
    redis: Redis,
    engine: AsyncEngine,
    prefix: Callable[[], str],
    tmp_path: Path,
) -> None:
    p, fresh = prefix(), prefix()
    settings = make_settings(flywheel_redis_prefix=p)
    routes = routes_for(
        r={
            "breaker": {"min_requests": 2, "cooldown_s": 60},
            "deployments": [
                {"name": "a", "provider": "mock", "model": "m"},
                {"name": "b", "provider": "mock", "model": "m"},
            ],
        }
    )
    one = Router(routes, settings)
    assert await publish_breakers(redis, p, one) == 0  # nothing open: no round trip
    assert not await redis.exists(breakers_key(p))
    a = one.deployments["r"][0].breaker
    a.failure()
    a.failure()
    assert a.current() == "open"
    await redis.hset(breakers_key(p), "r/stale", "1.0")  # long past: cleaned up
    assert await publish_breakers(redis, p, one) == 1
    assert set(await redis.hkeys(breakers_key(p))) == {b"r/a"}

    two = Router(routes, settings)
    assert await seed_breakers(redis, p, two) == 1
    states = {d.name: d.breaker.current() for d in two.deployments["r"]}
    assert states == {"a": "open", "b": "closed"}
    assert 55 < two.deployments["r"][0].breaker.snapshot()["open_for_s"] <= 60  # type: ignore[operator]

    info = await Snapshots(redis, engine, directory=tmp_path, prefix=p).create()
    assert info.counts["breakers"] == 1
    await Snapshots(redis, engine, directory=tmp_path, prefix=fresh).restore(info.id)
    three = Router(routes, settings)
    assert await seed_breakers(redis, fresh, three) == 1


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "flywheel"), "snapshot", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_create_list_restore_and_a_bad_file(
    redis_url: str,
    database_url: str,
    redis: Redis,
    engine: AsyncEngine,
    prefix: Callable[[], str],
    tmp_path: Path,
) -> None:
    p = prefix()
    await redis.hset(weights_key(p, "chat"), mapping={"a": "0.4", "b": "0.6"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "REDIS_"))}
    env |= {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "FLYWHEEL_REDIS_PREFIX": p,
        "FLYWHEEL_VAR_DIR": str(tmp_path),
        "FLYWHEEL_SNAPSHOT_DIR": str(tmp_path / "snaps"),
    }
    created = cli(env, "create", "--json")
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    listed = cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    assert made["id"] in listed.stdout
    assert made["checksum"] in listed.stdout
    assert f"{made['size_bytes']} B" in listed.stdout

    await redis.delete(weights_key(p, "chat"))
    restored = cli(env, "restore", made["id"])
    assert restored.returncode == 0, restored.stderr
    assert await redis.hgetall(weights_key(p, "chat")) == {b"a": b"0.4", b"b": b"0.6"}

    path = Path(made["path"])
    path.write_bytes(path.read_bytes()[:-20])
    await redis.delete(weights_key(p, "chat"))
    bad = cli(env, "restore", str(path))
    assert bad.returncode == 1
    assert "truncated" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert await redis.exists(weights_key(p, "chat")) == 0
    missing = cli(env, "restore", "snapshot-20200101T000000000000Z")
    assert missing.returncode == 1
    assert "no snapshot" in missing.stderr
