"""The Redis client: every call bounded by a short timeout, so an outage degrades."""

from __future__ import annotations

from redis.asyncio import Redis

from app.config import Settings


def make_redis(settings: Settings) -> Redis | None:
    dsn = settings.redis_dsn
    if dsn is None:
        return None
    timeout = settings.flywheel_redis_timeout_s
    client: Redis = Redis.from_url(
        dsn,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry_on_timeout=False,
        max_connections=256,
    )
    return client


def key(settings: Settings, *parts: str) -> str:
    return settings.flywheel_redis_prefix + ":".join(parts)
