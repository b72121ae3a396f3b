"""Stopping background tasks: cancel, wait, and cancel again when a cancel was lost."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("flywheel.background")

STOP_ROUNDS = 5
ROUND_S = 1.0


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until they end.

    A cancel can be lost: a library may turn the CancelledError it receives into an
    error of its own (a client's timeout or connection error), which a loop that rides
    out outages catches and carries on from, deaf to the cancel it was sent. A shutdown
    that awaited such a task would wait forever, before the request records are
    flushed. So a task still running after ROUND_S is cancelled again (by then it waits
    in its sleep, where a cancel lands), up to STOP_ROUNDS times; then it is left,
    and a warning names it. A task's own crash is logged, not raised: it must not cut
    the rest of a shutdown short.
    """
    live = [t for t in tasks if t is not None]
    pending = {t for t in live if not t.done()}
    for _ in range(STOP_ROUNDS):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=ROUND_S)
    if pending:
        names = ", ".join(sorted(t.get_name() for t in pending))
        log.warning("background tasks still running after %d cancels: %s", STOP_ROUNDS, names)
    for task in live:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            log.warning("background task %s had failed: %r", task.get_name(), error)
