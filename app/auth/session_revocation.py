"""Dashboard logout, server-side: a logged-out session is refused by every replica.

Sessions are signed and stateless (`app.auth.session`); the one thing stored is a
logout: a digest of the session's token in Redis, kept until the token would have
expired anyway. With Redis unreachable a logout still clears the browser's cookie but
cannot be recorded, and a session cannot be checked against the record: it is then
taken on its signature and expiry alone (an outage degrades; it does not lock the
operator out), and a warning says so.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.auth.session import api_session_tokens, expires_at, session_tokens

if TYPE_CHECKING:
    from app.state import AppState

log = logging.getLogger("flywheel.dashboard")

Finder = Callable[[Mapping[str, str], SecretStr | None, float], list[str]]


def _key(prefix: str, token: str) -> str:
    # A digest, not the token: what Redis holds cannot be replayed as a cookie.
    return f"{prefix}dashboard:revoked:{hashlib.sha256(token.encode()).hexdigest()[:40]}"


async def revoke(redis: Redis | None, prefix: str, token: str, now: float) -> bool:
    """Record the token's logout until it expires; False when it could not be."""
    ends = expires_at(token)
    if redis is None or ends is None or ends <= now:
        return False
    try:
        await redis.set(_key(prefix, token), b"1", ex=max(1, int(ends - now) + 1))
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("dashboard logout not recorded (Redis: %s): the session ends at expiry", e)
        return False
    return True


async def revoked(redis: Redis | None, prefix: str, token: str) -> bool:
    if redis is None:
        return False
    try:
        return bool(await redis.exists(_key(prefix, token)))
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("dashboard logouts not checked (Redis: %s)", e)
        return False


async def _live(state: AppState, headers: Mapping[str, str], find: Finder) -> bool:
    prefix = state.settings.flywheel_redis_prefix
    for token in find(headers, state.settings.flywheel_master_key, time.time()):
        if not await revoked(state.redis, prefix, token):
            return True
    return False


async def page_session(state: AppState, headers: Mapping[str, str]) -> bool:
    """Whether the request holds a live dashboard session (pages and their files)."""
    return await _live(state, headers, session_tokens)


async def api_session(state: AppState, headers: Mapping[str, str]) -> bool:
    """Whether an API request comes from a logged-in dashboard: a live session cookie
    beside the dashboard's own header."""
    return await _live(state, headers, api_session_tokens)


async def log_out(state: AppState, headers: Mapping[str, str]) -> None:
    """Revoke every live session the request carries."""
    now = time.time()
    prefix = state.settings.flywheel_redis_prefix
    for token in session_tokens(headers, state.settings.flywheel_master_key, now):
        await revoke(state.redis, prefix, token, now)
