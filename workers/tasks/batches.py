"""Batches: every worker looks for work every FLYWHEEL_BATCH_POLL_S and runs what it
takes (`workers.batch_run`), up to FLYWHEEL_BATCH_MAX_ACTIVE at once.

Nothing is queued per batch: `POST /v1/batches` only writes the row, and whichever
worker first claims it runs it (`app.store.batch_runs.claim_next`). A batch whose
worker died is taken over by the same path once its lease lapses, and resumes from its
journal. A Redis or database outage skips the tick (logged once) and never ends the
loop or the worker; a stopping worker lets its lines in flight finish (bounded),
checkpoints and lets its batches go, so another worker resumes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from app.files.storage import FileStorage
from app.observability.batch_metrics import BatchStats
from app.routing.config import load_routes
from app.routing.live_queue import LiveQueueGate
from app.runtime import open_state
from app.store.batch_runs import claim_next
from app.store.batch_slots import GlobalSlots
from workers.batch_run import SHUTDOWN_WAIT_S, BatchRun, BatchServices, now_utc
from workers.context import OUTAGES, finish, get_context, tick_until
from workers.llm_calls import redactors_for

log = logging.getLogger("flywheel.batches")
TASK_KEY = "batches"
# A line holds a global slot at most this long before the slot frees itself (a crashed
# worker's slots come back after it).
SLOT_HOLD_S = 600.0


class BatchLoop:
    def __init__(self, services: BatchServices) -> None:
        self.s = services
        self.settings = services.settings
        self.running: dict[str, asyncio.Task[str | None]] = {}
        # Batches this worker let go unfinished (a line it could not write, a bug):
        # not taken again before then, so a failure that repeats does not spin.
        self.resting: dict[str, float] = {}

    async def run(self) -> None:
        poll_s = self.settings.flywheel_batch_poll_s
        await tick_until(self.s.stopping, poll_s, self.tick, "batch loop", log)

    async def tick(self) -> None:
        """Claim batches while this worker has room for more."""
        now = time.monotonic()
        self.resting = {b: until for b, until in self.resting.items() if until > now}
        while len(self.running) < self.settings.flywheel_batch_max_active:
            batch = await claim_next(
                self.s.state.engine,
                self.s.worker_id,
                self.settings.flywheel_batch_lease_s,
                now_utc(),
                skip=[*self.running, *self.resting],
            )
            if batch is None:
                return
            log.info("batch %s (%s) taken by %s", batch.id, batch.status, self.s.worker_id)
            task = asyncio.create_task(BatchRun(self.s, batch).run(), name=f"batch-{batch.id}")
            self.running[batch.id] = task
            task.add_done_callback(functools.partial(self._ended, batch.id))
        self.s.stats.batches_active = len(self.running)

    def _ended(self, batch_id: str, task: asyncio.Task[str | None]) -> None:
        self.running.pop(batch_id, None)
        self.s.stats.batches_active = len(self.running)
        if task.cancelled() or self.s.stopping.is_set():
            return
        if task.exception() is not None:
            log.error("batch %s stopped on an error", batch_id, exc_info=task.exception())
        if task.exception() is not None or task.result() is None:
            self.resting[batch_id] = time.monotonic() + self.settings.flywheel_batch_lease_s

    async def stop(self) -> None:
        self.s.stopping.set()
        if self.running:
            await asyncio.wait(set(self.running.values()), timeout=SHUTDOWN_WAIT_S + 10)


async def on_startup(ctx: dict[str, Any]) -> None:
    wctx = get_context(ctx)
    settings = wctx.settings
    routes = load_routes(settings)
    stack = AsyncExitStack()
    state = await stack.enter_async_context(
        open_state(
            settings,
            routes,
            redactors_for(settings, routes),
            wctx.tracing,
            role="worker",
            max_connections=settings.flywheel_batch_global_concurrency * 2,
        )
    )
    # Batch lines are already bounded (FLYWHEEL_BATCH_GLOBAL_CONCURRENCY): the worker's
    # per-deployment limits start there instead of ramping up from the route's initial
    # (at 32 lines in flight the ramp cost ~15% of a short batch's throughput).
    for deployments in state.router.deployments.values():
        for d in deployments:
            d.limiter.start_at(settings.flywheel_batch_global_concurrency)
    redis, prefix = state.redis, settings.flywheel_redis_prefix
    assert redis is not None, "a worker always has Redis (its queue)"
    gate = LiveQueueGate(redis, prefix)
    stats = BatchStats(redis, prefix, wctx.worker_id, gate)
    services = BatchServices(
        settings=settings,
        state=state,
        storage=FileStorage.from_settings(settings),
        slots=GlobalSlots(redis, prefix, settings.flywheel_batch_global_concurrency, SLOT_HOLD_S),
        gate=gate,
        stats=stats,
        worker_id=wctx.worker_id,
    )
    loop = BatchLoop(services)
    stats_task = asyncio.create_task(stats.run_forever(), name="batch-stats")
    # A line may hold its slot past SLOT_HOLD_S (a long answer, waits on its key's
    # limits): renewed while this worker lives, they lapse only if it dies.
    renew_task = asyncio.create_task(services.slots.renew_forever(), name="batch-slots")
    ctx[TASK_KEY] = (
        loop,
        asyncio.create_task(loop.run(), name="flywheel-batches"),
        stats_task,
        renew_task,
        stack,
    )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    held = ctx.pop(TASK_KEY, None)
    if held is None:
        return
    loop, task, stats_task, renew_task, stack = held
    await loop.stop()
    await finish(task, 5.0, "the batch loop")
    for helper in (stats_task, renew_task):
        helper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await helper
    with contextlib.suppress(*OUTAGES):
        await loop.s.stats.close()
    await stack.aclose()


FUNCTIONS: list[Any] = []
CRONS: list[Any] = []
