"""Snapshots of the learned state, taken and restored by the workers.

- `snapshot_tick` (cron every 5 minutes, and at worker start): first warms a Redis that
  lost its data from the latest snapshot, then takes a snapshot when the newest one is
  older than FLYWHEEL_SNAPSHOT_INTERVAL_H. Deciding from the newest snapshot's age rather
  than from the clock means a restart neither skips a snapshot nor takes two, for any
  interval (fractional hours too); the tick sets the resolution.
- `snapshot_create` (admin endpoint): a snapshot now.
- `snapshot_restore(snapshot_id)` (admin endpoint): restore one, by id only (paths are
  for the CLI on the host, never for a queued job).

"Redis lost its data" is precise: `{prefix}snapshot:warmed` is set once a worker has
checked this Redis, so it disappears only with the data (a restart without persistence,
a flush). A Redis without it that still holds any learned state (a section's key: see
`app.store.snapshot_sections`) is left alone, so an operator's cache purge or deleted
weights are never "repaired" from an old snapshot.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import orjson
from arq import cron
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.store.jobs import note_run
from app.store.snapshot_file import SnapshotError
from app.store.snapshots import Snapshots
from workers.context import get_context
from workers.tracking import traced, tracked

log = logging.getLogger("flywheel.worker")

TICK_MINUTES = 5
# A snapshot is taken at the tick nearest its due time, not at the first one after it.
SLACK = timedelta(minutes=TICK_MINUTES / 2)
WARMED = "snapshot:warmed"
WARMING = "snapshot:warming"  # held by the one worker warming a fresh Redis
CREATING = "snapshot:creating"  # held while a tick takes a snapshot (two workers starting)
LOCK_S = 600


def _store(ctx: dict[str, Any]) -> Snapshots:
    wctx = get_context(ctx)
    return Snapshots.from_settings(wctx.settings, ctx["redis"], wctx.engine)


async def warm_if_fresh(store: Snapshots, redis: Redis, owner: str) -> dict[str, Any] | None:
    """Restore the latest usable snapshot this installation (Redis prefix) took into a
    Redis that lost its data; None when this Redis was checked before (or another
    worker is checking it now)."""
    marker, lock = store.prefix + WARMED, store.prefix + WARMING
    if await redis.exists(marker) or not await redis.set(lock, owner, nx=True, ex=LOCK_S):
        return None
    try:
        if await store.holds_state():
            outcome: dict[str, Any] = {"warmed_from": None, "reason": "Redis holds learned state"}
        else:
            outcome = await _restore_latest(store)
        await redis.set(marker, orjson.dumps({"at": time.time(), "by": owner, **outcome}))
        return outcome
    finally:
        await redis.delete(lock)


async def _restore_latest(store: Snapshots) -> dict[str, Any]:
    for sid in await store.known():
        try:
            result = await store.restore(sid, same_prefix=True)
        except SnapshotError as e:  # a bad file: the one before it may still be good
            log.warning("snapshot %s not used to warm Redis: %s", sid, e)
            continue
        log.info(
            "Redis held no learned state: warmed from snapshot %s (%s)", sid, result["restored"]
        )
        return {"warmed_from": sid, "restored": result["restored"]}
    log.info("Redis holds no learned state and there is no usable snapshot to warm it")
    return {"warmed_from": None, "reason": "no usable snapshot"}


@tracked
async def snapshot_tick(ctx: dict[str, Any]) -> dict[str, Any]:
    wctx = get_context(ctx)
    redis: Redis = ctx["redis"]
    store = _store(ctx)
    out: dict[str, Any] = {}
    warmed = await warm_if_fresh(store, redis, wctx.worker_id)
    if warmed is not None:
        out["warm"] = warmed
    interval = timedelta(hours=wctx.settings.flywheel_snapshot_interval_h) - SLACK
    lock = store.prefix + CREATING
    if await store.due(interval) and await redis.set(lock, wctx.worker_id, nx=True, ex=LOCK_S):
        try:
            out["created"] = (await store.create()).id
        finally:
            await redis.delete(lock)
    return out


@tracked
async def snapshot_create(ctx: dict[str, Any]) -> dict[str, Any]:
    return (await _store(ctx).create()).as_dict()


@traced
async def snapshot_restore(ctx: dict[str, Any], snapshot_id: str) -> dict[str, Any]:
    """Not `tracked`: a restore is an operator's decision for this moment. Retried minutes
    later it would overwrite what was learned meanwhile, and a bad file fails the same way
    every time; the outcome is still noted for /health/detailed."""
    started = time.perf_counter()
    try:
        result = await _store(ctx).restore(snapshot_id)
    except Exception as e:
        await _note(ctx, started, ok=False, error=type(e).__name__)
        raise
    await _note(ctx, started, ok=True, detail={"id": result["id"], **result["restored"]})
    return result


async def _note(ctx: dict[str, Any], started: float, **outcome: Any) -> None:
    prefix = get_context(ctx).settings.flywheel_redis_prefix
    try:
        duration = time.perf_counter() - started
        await note_run(ctx["redis"], prefix, "snapshot_restore", duration_s=duration, **outcome)
    except (RedisError, OSError) as e:  # the outcome is a report; losing it is no failure
        log.warning("outcome of snapshot_restore not noted: %s", type(e).__name__)


FUNCTIONS = [snapshot_create, snapshot_restore]
CRONS = [
    cron(snapshot_tick, minute=set(range(0, 60, TICK_MINUTES)), run_at_startup=True),
]
