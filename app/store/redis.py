"""The Redis client: every call bounded by a short timeout, so an outage degrades."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis

from app.config import Settings

log = logging.getLogger("flywheel.redis")
RESUBSCRIBE_S = 1.0


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


async def follow_channel(
    subscriber: Redis,
    channel: str,
    on_message: Callable[[bytes], None],
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Call `on_message` with every message on `channel`, forever, resubscribing after
    any failure. `subscriber` must have no read timeout (a subscription waits
    indefinitely). `on_subscribed` runs after each (re)subscription: messages sent while
    unsubscribed were missed, and the caller may need to assume the worst."""
    while True:
        try:
            async with subscriber.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                if on_subscribed is not None:
                    on_subscribed()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        on_message(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure: resubscribe after a pause
            log.debug("subscription to %s lost: %s", channel, e)
        await asyncio.sleep(RESUBSCRIBE_S)
