"""Tracked jobs: every run's outcome noted for `/health/detailed`, failures retried.

A failed run is retried by arq with exponential backoff (5 s, 10 s, 20 s, … capped at
5 min) up to `MAX_TRIES`; the failure is visible in the job's entry meanwhile.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from arq import Retry
from redis.exceptions import RedisError

from app.observability.tracing import TRACEPARENT, context_of
from app.store.jobs import note_run
from workers.context import get_context

log = logging.getLogger("flywheel.worker")

T = TypeVar("T")
MAX_TRIES = 5
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 300.0


def backoff_s(job_try: int) -> float:
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** max(0, job_try - 1)))


def traced(
    fn: Callable[..., Awaitable[T]],
) -> Callable[..., Coroutine[Any, Any, T]]:
    """Run an arq job in a span; one enqueued while serving a request (an admin call)
    carries that request's trace context (`traceparent=`), and its span joins it."""
    name = "job " + fn.__name__

    @functools.wraps(fn)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> T:
        parent = context_of(kwargs.pop(TRACEPARENT, None))
        attempt = int(ctx.get("job_try") or 1)
        with get_context(ctx).tracing.job_span(name, parent, attempt):
            return await fn(ctx, *args, **kwargs)

    return run


def tracked(
    fn: Callable[..., Awaitable[T]],
) -> Callable[..., Coroutine[Any, Any, T]]:
    """Wrap an arq job so its outcome is noted and a failure retried (and traced)."""
    name = fn.__name__
    job = traced(fn)

    @functools.wraps(fn)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> T:
        prefix = get_context(ctx).settings.flywheel_redis_prefix
        started = time.perf_counter()
        try:
            result = await job(ctx, *args, **kwargs)
        except Exception as e:
            tries = int(ctx.get("job_try") or 1)
            log.warning("job %s failed (try %d of %d): %r", name, tries, MAX_TRIES, e)
            await _note(ctx, prefix, name, ok=False, started=started, error=f"{type(e).__name__}")
            if tries < MAX_TRIES:
                raise Retry(defer=backoff_s(tries)) from e
            raise
        detail = result if isinstance(result, dict) else None
        await _note(ctx, prefix, name, ok=True, started=started, detail=detail)
        return result

    return run


async def _note(
    ctx: dict[str, Any],
    prefix: str,
    name: str,
    *,
    ok: bool,
    started: float,
    error: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    try:
        await note_run(
            ctx["redis"],
            prefix,
            name,
            ok=ok,
            duration_s=time.perf_counter() - started,
            error=error,
            detail=detail,
        )
    except (RedisError, OSError) as e:  # the outcome is a report; losing it is no failure
        log.warning("outcome of job %s not noted: %s", name, type(e).__name__)
