"""Who is running the cycle, and when the next scheduled run is due (Redis).

One run at a time across every worker and trigger: `{prefix}cycle:current` holds the
id of the job running (or queued to run) the cycle, taken only when free (one Lua step
takes it or names its holder) and released only by its holder. A trigger that finds it
held answers with that job instead of queueing a second; a schedule tick that finds it
held skips. Its expiry outlives the longest run, so a worker killed mid-run frees it
without anyone's help.

`{prefix}cycle:next_at` is when the next scheduled run is due (epoch seconds): whichever
worker first sees it pass takes the run, so N workers schedule as one and a restart
neither skips nor repeats a run.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis

HOLD_S = 900  # longer than any run (the job timeout is 300 s)

# Deletes the key only when it still holds the caller's id.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def current_key(prefix: str) -> str:
    return f"{prefix}cycle:current"


def next_key(prefix: str) -> str:
    return f"{prefix}cycle:next_at"


# Takes the key for ARGV[1], or answers who holds it, in one step: a SET NX then a GET
# could find the holder gone in between and name no one.
_CLAIM = """
local held = redis.call('get', KEYS[1])
if held then return held end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""


async def claim(redis: Redis, prefix: str, owner: str) -> str | None:
    """Take the cycle for `owner`; None when taken, else the holder's id."""
    held = await cast(
        Awaitable[bytes | str | None],
        redis.eval(_CLAIM, 1, current_key(prefix), owner, str(HOLD_S)),
    )
    return held.decode() if isinstance(held, bytes) else held


async def release(redis: Redis, prefix: str, owner: str) -> bool:
    done = await cast(Awaitable[int], redis.eval(_RELEASE, 1, current_key(prefix), owner))
    return bool(done)


async def due(redis: Redis, prefix: str, now: float, interval_s: float) -> bool:
    """Whether a scheduled run is due at `now`; when it is, the next one is set. Two
    workers may both see it due: `claim` lets one of them run it."""
    raw = await redis.get(next_key(prefix))
    if raw is not None and float(raw) > now:
        return False
    await redis.set(next_key(prefix), f"{now + interval_s:.3f}")
    return True


async def next_at(redis: Redis, prefix: str) -> float | None:
    raw = await redis.get(next_key(prefix))
    return None if raw is None else float(raw)
