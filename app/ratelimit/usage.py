"""What keys have used of their limits, read from the limiter's Redis counters.

Read-only: the admin API shows it; nothing here writes or deletes (the reserve script
prunes old buckets as it goes). A page of keys costs one pipelined round trip, bounded
by `TIMEOUT_S`, and Redis's own TIME is in that pipeline, so "the last minute" ends at
the same clock the reserve script measures it by, whatever this host's clock says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.ratelimit.periods import period_of
from app.ratelimit.quota import NANO, WINDOW_S, Quota
from app.ratelimit.redis_window import limit_keys

TIMEOUT_S = 1.0


def _int(value: Any) -> int:
    """A counter's value; anything unreadable (a hand-edited key) counts as nothing."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _window_total(buckets: Mapping[bytes, bytes], now_sec: int) -> int:
    # The buckets the reserve script would count now: whole seconds, the current one
    # included. Older ones may still be there (it prunes only when it runs).
    oldest = now_sec - WINDOW_S + 1
    return sum(_int(n) for s, n in buckets.items() if _int(s) >= oldest)


def _usage(
    quota: Quota, period: tuple[str, float | None], raw: Sequence[Any], now_sec: int
) -> dict[str, Any]:
    requests, tokens, spent = raw
    _, ends = period
    return {
        "requests_per_min": {"used": _window_total(requests, now_sec), "limit": quota.rpm},
        "tokens_per_min": {"used": _window_total(tokens, now_sec), "limit": quota.tpm},
        "budget": {
            "spent_usd": _int(spent) / NANO,
            "limit_usd": quota.budget_usd,
            "period": quota.period,
            "resets_at": None if ends is None else datetime.fromtimestamp(ends, UTC).isoformat(),
        },
    }


async def read_usage(
    redis: Redis | None, prefix: str, quotas: Sequence[Quota]
) -> dict[str, dict[str, Any]] | None:
    """Each key's usage by key id; None when Redis is absent or does not answer in time.

    Counters exist only for the limits a key has (or had, for up to a minute or the
    rest of a budget period); where none exists the use is 0.
    """
    if redis is None:
        return None
    # The period is chosen by this host's clock, as the reserve call chooses it.
    now = time.time()
    periods = [period_of(q.period, now) for q in quotas]
    try:
        async with asyncio.timeout(TIMEOUT_S):
            async with redis.pipeline(transaction=False) as pipe:  # one round trip
                pipe.time()
                for quota, (period_id, _) in zip(quotas, periods, strict=True):
                    req, tok, usd = limit_keys(prefix, quota.key_id, period_id)
                    pipe.hgetall(req)
                    pipe.hgetall(tok)
                    pipe.get(usd)
                redis_time, *raw = await pipe.execute()
    except (RedisError, OSError, TimeoutError):
        return None
    now_sec = _int(redis_time[0])
    return {
        q.key_id: _usage(q, period, raw[3 * i : 3 * i + 3], now_sec)
        for i, (q, period) in enumerate(zip(quotas, periods, strict=True))
    }
