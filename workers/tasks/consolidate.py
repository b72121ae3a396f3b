"""The consolidator: a long-lived task in every worker, draining the request stream.

Not a cron job: records should reach the database within seconds, and the consumer
group lets every worker take a share. It starts with the worker and, on a graceful
shutdown, finishes (and acknowledges) the batch in hand before the worker exits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq import cron

from app.observability.langsmith_runs import make_langsmith
from app.store.consolidation import (
    Consolidator,
    ConsolidatorConfig,
    consolidation_status,
    prune_consumers,
)
from workers.context import finish, get_context
from workers.tracking import tracked

log = logging.getLogger("flywheel.worker")
TASK_KEY = "consolidator"
LANGSMITH_KEY = "langsmith"
STOP_WAIT_S = 20.0


async def on_startup(ctx: dict[str, Any]) -> None:
    wctx = get_context(ctx)
    s = wctx.settings
    consolidator = Consolidator(
        ctx["redis"],
        wctx.engine,
        ConsolidatorConfig(
            prefix=s.flywheel_redis_prefix,
            consumer=wctx.worker_id,
            batch_size=s.flywheel_consolidate_batch_size,
            delay_s=s.flywheel_consolidate_delay_s,
            claim_idle_s=s.flywheel_consolidate_claim_idle_s,
        ),
        tracing=wctx.tracing,
    )
    # Feedback is forwarded from here, once it is known to name a request of its tenant.
    langsmith = make_langsmith(s)
    if langsmith is not None:
        consolidator.on_feedback = langsmith.feedback
        ctx[LANGSMITH_KEY] = langsmith
    await consolidator.ensure_group()
    task = asyncio.create_task(consolidator.run(), name="flywheel-consolidator")
    ctx[TASK_KEY] = (consolidator, task)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    held = ctx.pop(TASK_KEY, None)
    if held is None:
        return
    consolidator, task = held
    consolidator.stop()
    # Cancelled past the wait, whatever it held stays pending; another worker claims it.
    await finish(task, STOP_WAIT_S, "consolidator")
    log.info("consolidator stopped after %d records", consolidator.processed)
    langsmith = ctx.pop(LANGSMITH_KEY, None)
    if langsmith is not None:
        await asyncio.to_thread(langsmith.close, 5.0)


@tracked
async def consolidation_report(ctx: dict[str, Any]) -> dict[str, Any]:
    """The queue's state, noted each minute so `/health/detailed` shows it as a job too;
    it fails (and so shows as failing) when this worker's consolidator has died."""
    held = ctx.get(TASK_KEY)
    if held is not None and held[1].done():
        raise RuntimeError("the consolidator task has stopped")
    prefix = get_context(ctx).settings.flywheel_redis_prefix
    pruned = await prune_consumers(ctx["redis"], prefix)
    return {**await consolidation_status(ctx["redis"], prefix), "consumers_pruned": pruned}


FUNCTIONS = [consolidation_report]
CRONS = [cron(consolidation_report, second={30}, run_at_startup=False)]
