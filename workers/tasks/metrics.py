"""Metrics persistence: request rows become metrics points every metrics interval.

arq crons fire on wall-clock sets, so `FLYWHEEL_METRICS_INTERVAL_S` becomes the longest
period that divides the minute (intervals under a minute) or the hour (in whole minutes)
and is no longer than the interval: 300 s → minutes 0, 5, … 55 at second 0; 30 s →
seconds 0 and 30; 3600 s → minute 0. An interval that divides neither runs more often
than its buckets close (420 s → every 6 minutes, 90 s → every minute, 45 s → every
30 s). That is harmless: buckets are aligned to the interval itself, not to the runs, and
every run recomputes the open bucket and those closed within the consolidation lag, so
extra runs only show the open bucket sooner; nothing is missed or counted twice.

`persist_metrics` can also be enqueued by name (e.g. to see the current bucket now). It
runs at worker start-up too, catching up on the buckets missed while no worker ran.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from arq import cron
from redis.asyncio import Redis

from app.config import Settings
from app.store.consolidation import late_key
from app.store.metrics_history import persist
from workers.context import get_context
from workers.tracking import tracked

# Periods (s or min) that divide 60, so a cron set repeats evenly every minute or hour.
_DIVISORS_OF_60 = tuple(p for p in range(1, 61) if 60 % p == 0)
# A long catch-up commits bucket by bucket, so even a run cut short keeps its progress.
JOB_TIMEOUT_S = 600


def schedule(interval_s: int) -> dict[str, set[int]]:
    """arq cron keyword arguments for a run at least every `interval_s` seconds."""
    if interval_s < 60:
        step = max(p for p in _DIVISORS_OF_60 if p <= interval_s)
        return {"second": set(range(0, 60, step))}
    step = max(p for p in _DIVISORS_OF_60 if p <= interval_s // 60)
    return {"minute": set(range(0, 60, step)), "second": {0}}


@tracked
async def persist_metrics(ctx: dict[str, Any]) -> dict[str, Any]:
    wctx = get_context(ctx)
    s = wctx.settings
    redis: Redis = ctx["redis"]
    key = late_key(s.flywheel_redis_prefix)
    # Taken (atomically) before aggregating: rows written meanwhile mark it anew.
    popped = await redis.zpopmin(key)
    late = datetime.fromtimestamp(float(popped[0][1]), UTC) if popped else None
    try:
        return await persist(
            wctx.engine,
            now=datetime.now(UTC),
            interval_s=s.flywheel_metrics_interval_s,
            history_points=s.flywheel_metrics_history_points,
            late=late,
        )
    except BaseException:
        if late is not None:  # not aggregated after all: the next run must still see it
            await redis.zadd(key, {"oldest": late.timestamp()}, lt=True)
        raise


FUNCTIONS = [persist_metrics]
CRONS = [
    cron(
        persist_metrics,
        **schedule(Settings().flywheel_metrics_interval_s),  # type: ignore[arg-type]
        run_at_startup=True,
        timeout=JOB_TIMEOUT_S,
    )
]
