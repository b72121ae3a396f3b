"""A global bound on batch lines in flight, shared by every worker through Redis.

`{prefix}batch:slots` is a sorted set of slot token → when its hold lapses. One script
drops the lapsed holders and takes a slot if fewer than `limit` remain, so N workers
never hold more than `limit` between them, and a crashed worker's slots free themselves
after `hold_s` (a line held longer renews its slot). The script reads the time from
Redis, so workers whose clocks disagree still agree on what has lapsed.

While Redis does not answer, slots come from an in-process count instead (`local_limit`,
by default `limit`): batches keep running under a local bound rather than stall or run
unbounded; Redis is tried again every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("flywheel.batches")

CALL_TIMEOUT_S = 1.0
BACKOFF_FIRST_S = 0.02
BACKOFF_CAP_S = 0.5
# After a failure Redis is left alone this long: during an outage every acquire would
# otherwise pay a timeout before falling back.
RETRY_REDIS_AFTER_S = 5.0
LOCAL = "local:"

# KEYS[1] the holders. ARGV: limit, hold (s), token.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local hold = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], string.format('%.6f', now + hold), ARGV[3])
-- The key goes when its last holder would lapse; never shortened (holds may differ).
local keep = math.ceil(hold * 1000)
if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
return 1
"""

# KEYS[1] the holders. ARGV: hold (s), tokens…; how many were still held (and renewed).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local hold = tonumber(ARGV[1])
local until_s = string.format('%.6f', now + hold)
local renewed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], until_s, ARGV[i])
    renewed = renewed + 1
  end
end
local keep = math.ceil(hold * 1000)
if renewed > 0 and redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
return renewed
"""


def slots_key(prefix: str) -> str:
    return f"{prefix}batch:slots"


class GlobalSlots:
    """`acquire` a slot token (None once `stop` is set), `release` it when the line ends."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        limit: int,
        hold_s: float,
        *,
        local_limit: int | None = None,
    ) -> None:
        self.limit = limit
        self.hold_s = hold_s
        self.local_limit = local_limit or limit
        self._redis = redis
        self._key = slots_key(prefix)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._local_held = 0  # slots taken here while Redis was down
        self._held: set[str] = set()  # this instance's Redis tokens, for renew()
        self._redis_after = 0.0  # monotonic; Redis is not tried before this
        self._failing = False

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    async def acquire(self, stop: asyncio.Event | None = None) -> str | None:
        delay = BACKOFF_FIRST_S
        while not (stop is not None and stop.is_set()):
            token = await self._try_redis()
            if token is None and time.monotonic() < self._redis_after:
                token = self._try_local()
            if token is not None:
                return token
            # Full: jittered, growing polls, so waiting workers do not hit Redis in step.
            await _sleep(random.uniform(delay / 2, delay), stop)
            delay = min(delay * 2, BACKOFF_CAP_S)
        return None

    async def _try_redis(self) -> str | None:
        if time.monotonic() < self._redis_after:
            return None
        token = uuid.uuid4().hex
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                args: list[str | float] = [self.limit, self.hold_s, token]
                taken = int(await self._acquire(keys=[self._key], args=args))
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            return None
        self._failing = False
        if not taken:
            return None
        self._held.add(token)
        return token

    def _try_local(self) -> str | None:
        if self._local_held >= self.local_limit:
            return None
        self._local_held += 1
        return LOCAL + uuid.uuid4().hex

    async def release(self, token: str) -> None:
        if token.startswith(LOCAL):
            self._local_held = max(0, self._local_held - 1)
            return
        self._held.discard(token)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self._redis.zrem(self._key, token)
        except (RedisError, OSError, TimeoutError) as e:
            # Not lost: the slot frees itself when its hold lapses.
            log.debug("batch slot not released (%s); it lapses within %.0fs", e, self.hold_s)

    async def renew(self, tokens: Iterable[str] | None = None) -> int:
        """Extend the holds of `tokens` (default: every slot held here) by `hold_s`;
        how many were renewed. A hold that had lapsed is not renewed: its slot may be
        someone else's by now. Local slots need no renewal and are not counted."""
        given = self._held if tokens is None else tokens
        wanted = sorted(t for t in given if not t.startswith(LOCAL))
        if not wanted:
            return 0
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return int(await self._renew(keys=[self._key], args=[self.hold_s, *wanted]))
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            return 0

    async def renew_forever(self, interval_s: float | None = None) -> None:
        """Renew every slot held here, by default three times per hold."""
        while True:
            await asyncio.sleep(interval_s or self.hold_s / 3)
            await self.renew()

    def _failed(self, e: BaseException) -> None:
        if not self._failing:  # one warning per outage
            log.warning(
                "batch slots not reachable in Redis (%s); at most %d batch lines at once "
                "in this process until it answers",
                type(e).__name__,
                self.local_limit,
            )
        self._failing = True
        self._redis_after = time.monotonic() + RETRY_REDIS_AFTER_S


async def _sleep(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
