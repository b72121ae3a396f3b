"""The virtuous cycle's scheduling: a run every FLYWHEEL_CYCLE_INTERVAL_S, and on demand.

- Every worker runs a small loop; whichever first sees the scheduled run due takes it
  (`app.store.cycle_lock`), so N workers schedule as one and a restart neither skips
  nor repeats a run.
- `cycle_run(job_id)` is the job `POST /v1/virtuous-cycle/trigger` queues, holding the
  cycle under its job id; a run already holding it makes the trigger answer with that
  run instead of queueing another.

Either way one run at a time, across every worker. A Redis or database outage skips the
tick (logged once) and never ends the loop or the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from app.routing.config import load_routes
from app.store.cycle_lock import claim, due, release
from workers.context import OUTAGES, finish, get_context, tick_until
from workers.cycle_run import CycleRunner
from workers.llm_calls import LLMCalls
from workers.tasks import alerts
from workers.tracking import tracked

log = logging.getLogger("flywheel.cycle")
TASK_KEY = "cycle"
LLM_KEY = "cycle_llm"  # the judge's and the optimizer's caller, when either is configured
TICK_S = 5.0  # how often a worker looks whether a scheduled run is due
STOP_WAIT_S = 30.0


def _runner(ctx: dict[str, Any]) -> CycleRunner:
    wctx = get_context(ctx)
    held = ctx.get(alerts.TASK_KEY)
    alert_loop = held[0] if held else None
    return CycleRunner(
        wctx.settings,
        ctx["cycle_routes"],
        ctx["redis"],
        wctx.engine,
        alert_loop,
        llm=ctx.get(LLM_KEY),
    )


@tracked
async def cycle_run(ctx: dict[str, Any], job_id: str) -> dict[str, Any]:
    """A run on demand, holding the cycle under `job_id` (the trigger took it for us)."""
    redis, prefix = ctx["redis"], get_context(ctx).settings.flywheel_redis_prefix
    running = await claim(redis, prefix, job_id)
    if running not in (None, job_id):
        # The trigger's hold expired and another run took the cycle meanwhile.
        return {"skipped": True, "running": running}
    try:
        return await _runner(ctx).run("manual", job_id)
    finally:
        with contextlib.suppress(*OUTAGES):
            await release(redis, prefix, job_id)


class Schedule:
    def __init__(self, ctx: dict[str, Any]) -> None:
        self.ctx = ctx
        self.settings = get_context(ctx).settings
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await tick_until(self._stop, TICK_S, self.tick, "cycle schedule", log)

    async def tick(self) -> dict[str, Any] | None:
        redis, prefix = self.ctx["redis"], self.settings.flywheel_redis_prefix
        if not await due(redis, prefix, time.time(), self.settings.flywheel_cycle_interval_s):
            return None
        owner = f"schedule-{uuid.uuid4().hex[:16]}"
        if await claim(redis, prefix, owner) is not None:
            return None  # a triggered run (or another worker) has the cycle
        try:
            return await _runner(self.ctx).run("schedule", None)
        finally:
            with contextlib.suppress(*OUTAGES):
                await release(redis, prefix, owner)


async def on_startup(ctx: dict[str, Any]) -> None:
    settings = get_context(ctx).settings
    ctx["cycle_routes"] = load_routes(settings)
    ctx[LLM_KEY] = LLMCalls.open(settings, ctx["cycle_routes"])
    schedule = Schedule(ctx)
    ctx[TASK_KEY] = (schedule, asyncio.create_task(schedule.run(), name="flywheel-cycle"))


async def on_shutdown(ctx: dict[str, Any]) -> None:
    held = ctx.pop(TASK_KEY, None)
    if held is not None:
        schedule, task = held
        schedule.stop()
        await finish(task, STOP_WAIT_S, "the cycle schedule")
    llm: LLMCalls | None = ctx.pop(LLM_KEY, None)
    if llm is not None:  # after the schedule: a run finishing may still be calling
        await llm.close()


FUNCTIONS = [cycle_run]
CRONS: list[Any] = []
