"""Anomaly alerts: a long-lived loop in every worker, one evaluation per interval.

Not an arq cron job: the interval is in seconds and configurable. Every worker runs the
loop, and whichever takes the tick's Redis lock (SET NX, held for most of an interval)
evaluates: the per-deployment aggregates from the database, the detector and the
triage (app.observability.anomaly), then each escalated candidate is raised unless the
same (subject, kind) was raised within the cooldown (SET NX PX, atomic across workers),
stored, logged and posted to the webhook.

A Redis or database outage skips the tick and is logged once, not every tick; it never
stops the loop or the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.observability.anomaly import Candidate, Thresholds, detect, triage
from app.store.alerts import Span, alert_json, deployment_stats, insert_alert, set_webhook_status
from app.store.db import DB_ERRORS
from workers.context import finish, get_context

log = logging.getLogger("flywheel.alerts")
TASK_KEY = "alerts"
STOP_WAIT_S = 15.0
REDIS_TIMEOUT_S = 2.0
DB_TIMEOUT_S = 15.0
# The tick lock lives for this share of the interval: the holder's next tick finds it
# free, another worker's tick within the interval does not.
LOCK_SHARE = 0.9
# How long one tick's candidates are remembered for the next (medium needs two ticks).
SEEN_TTL_TICKS = 2.5
WEBHOOK_TIMEOUT_S = 10.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
OUTAGES = (RedisError, *DB_ERRORS)


@dataclass(frozen=True, slots=True)
class AlertConfig:
    prefix: str
    interval_s: float
    window_s: float
    baseline_s: float
    cooldown_s: float
    thresholds: Thresholds

    @classmethod
    def from_settings(cls, s: Settings) -> AlertConfig:
        return cls(
            prefix=s.flywheel_redis_prefix,
            interval_s=s.flywheel_alert_interval_s,
            window_s=s.flywheel_alert_window_s,
            baseline_s=s.flywheel_alert_baseline_s,
            cooldown_s=s.flywheel_alert_cooldown_s,
            thresholds=Thresholds(min_samples=s.flywheel_alert_min_samples),
        )

    def key(self, *parts: str) -> str:
        return self.prefix + "alerts:" + ":".join(parts)


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class Webhook:
    """POSTs each alert as JSON. Connection errors, timeouts, 408, 429 and 5xx are
    retried with jittered, capped exponential backoff (Retry-After honoured within the
    cap); other answers are final. The URL may hold a token, so it is never logged."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        retries: int,
        *,
        timeout_s: float = WEBHOOK_TIMEOUT_S,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        self._http = http
        self._url = url
        self._retries = retries
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._base_s = backoff_base_s
        self._cap_s = backoff_cap_s

    def _backoff_s(self, attempt: int, retry_after: str | None) -> float:
        ceiling = min(self._cap_s, self._base_s * 2.0 ** (attempt - 1))
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                ceiling = min(self._cap_s, max(ceiling, float(retry_after)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter, not a secret

    async def deliver(self, alert: dict[str, Any]) -> tuple[bool, int, str]:
        """(delivered, attempts made, the last outcome: "HTTP 500", "ClientConnectorError")."""
        body = orjson.dumps(
            {**alert, "text": f"[{alert['severity']}] {alert['kind']}: {alert['message']}"}
        )
        # The receiver can drop a retried delivery it already took by this header.
        headers = {"content-type": "application/json", "idempotency-key": str(alert["id"])}
        outcome = ""
        for attempt in range(1, self._retries + 2):
            retry_after: str | None = None
            try:
                async with self._http.post(
                    self._url, data=body, headers=headers, timeout=self._timeout
                ) as resp:
                    outcome = f"HTTP {resp.status}"
                    if resp.status < 300:
                        return True, attempt, outcome
                    if not _retryable(resp.status):
                        return False, attempt, outcome
                    retry_after = resp.headers.get("retry-after")
            except (aiohttp.ClientError, TimeoutError) as e:
                outcome = type(e).__name__  # str(e) may quote the URL
            if attempt <= self._retries:
                await asyncio.sleep(self._backoff_s(attempt, retry_after))
        return False, self._retries + 1, outcome


class AlertLoop:
    def __init__(
        self,
        redis: Redis,
        engine: AsyncEngine,
        config: AlertConfig,
        webhook: Webhook | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.config = config
        self.webhook = webhook
        self.clock = clock  # tests evaluate at a time of their own
        self._stop = asyncio.Event()
        self._down: str | None = None  # the outage being sat out, logged when it began

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            started = loop.time()
            try:
                await self.tick()
            except Exception:  # a bug in one tick must not end detection for good
                log.exception("anomaly detection tick failed")
            wait_s = max(0.0, self.config.interval_s - (loop.time() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait_s)

    async def tick(self) -> list[dict[str, Any]] | None:
        """This tick's alerts; None when another worker has the tick or Redis or the
        database is down."""
        c = self.config
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                mine = await self.redis.set(
                    c.key("tick"), "1", nx=True, px=max(1, int(c.interval_s * LOCK_SHARE * 1000))
                )
            if not mine:
                return None
            alerts = await self.evaluate(self.clock())
        except OUTAGES as e:
            if self._down is None:
                log.warning(
                    "anomaly detection paused: Redis or the database did not answer (%s); "
                    "retrying every %.0f s",
                    type(e).__name__,
                    c.interval_s,
                )
            self._down = type(e).__name__
            return None
        if self._down is not None:
            log.info("anomaly detection resumed after %s", self._down)
            self._down = None
        return alerts

    async def evaluate(self, now: datetime) -> list[dict[str, Any]]:
        """One evaluation at `now`, whoever holds the tick: the alerts raised."""
        c = self.config
        async with asyncio.timeout(DB_TIMEOUT_S):
            stats = await deployment_stats(self.engine, Span(now, c.window_s, c.baseline_s))
        decided = triage(detect(stats, c.thresholds), await self._last_seen())
        await self._remember(decided.seen)
        for held in decided.held:
            log.info(
                "alert held (medium, first seen): %s %s z=%.2f", held.subject, held.kind, held.z
            )
        return await self.raise_all(decided.escalated, now)

    async def raise_all(
        self, candidates: Sequence[Candidate], now: datetime
    ) -> list[dict[str, Any]]:
        """Raise each candidate (stored, logged, sent to the webhook) unless its (subject,
        kind) was raised within the cooldown; the alerts raised. The virtuous cycle's
        monitor raises its findings here too."""
        raised: list[dict[str, Any]] = []
        try:
            for candidate in candidates:
                row = await self._raise(candidate, now)
                if row is not None:
                    raised.append(row)
        except OUTAGES:
            await self._deliver_all(raised)  # those stored before the outage still go out
            raise
        await self._deliver_all(raised)
        return raised

    async def _deliver_all(self, rows: list[dict[str, Any]]) -> None:
        if self.webhook is not None and rows:
            await asyncio.gather(*(self._deliver(self.webhook, row) for row in rows))

    async def _last_seen(self) -> set[tuple[str, str]]:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            raw = await self.redis.get(self.config.key("seen"))
        return {(s, k) for s, k in orjson.loads(raw)} if raw else set()

    async def _remember(self, seen: set[tuple[str, str]]) -> None:
        ttl_ms = max(1, int(self.config.interval_s * SEEN_TTL_TICKS * 1000))
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await self.redis.set(self.config.key("seen"), orjson.dumps(sorted(seen)), px=ttl_ms)

    async def _raise(self, candidate: Candidate, now: datetime) -> dict[str, Any] | None:
        """Store and log the alert, unless its (subject, kind) was raised within the
        cooldown (by any worker); the stored row."""
        c = self.config
        dedupe = c.key("dedupe", candidate.subject, candidate.kind)
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            fresh = await self.redis.set(dedupe, "1", nx=True, px=max(1, int(c.cooldown_s * 1000)))
        if not fresh:
            return None
        status = "pending" if self.webhook is not None else "not_configured"
        try:
            async with asyncio.timeout(DB_TIMEOUT_S):
                row = await insert_alert(self.engine, candidate, now, status)
        except DB_ERRORS:
            # Not stored, so not raised: free its cooldown for the next tick to try again.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    await self.redis.delete(dedupe)
            raise
        log.warning(
            "alert %s %s severity=%s z=%.2f: %s",
            candidate.subject,
            candidate.kind,
            candidate.severity,
            candidate.z,
            candidate.message,
        )
        return row

    async def _deliver(self, webhook: Webhook, row: dict[str, Any]) -> None:
        ok, attempts, outcome = await webhook.deliver(alert_json(row))
        row["webhook_status"] = "sent" if ok else "failed"
        if not ok:
            log.warning(
                "alert %s not delivered to the webhook after %d attempts (%s)",
                row["id"],
                attempts,
                outcome,
            )
        try:
            async with asyncio.timeout(DB_TIMEOUT_S):
                await set_webhook_status(self.engine, row["id"], row["webhook_status"])
        except DB_ERRORS as e:
            log.warning("alert %s webhook status not stored: %s", row["id"], type(e).__name__)


async def on_startup(ctx: dict[str, Any]) -> None:
    s = get_context(ctx).settings
    http: aiohttp.ClientSession | None = None
    webhook: Webhook | None = None
    if s.flywheel_alert_webhook_url is not None:
        http = aiohttp.ClientSession(trust_env=False, raise_for_status=False)
        url = s.flywheel_alert_webhook_url.get_secret_value()
        webhook = Webhook(http, url, s.flywheel_alert_webhook_retries)
    loop = AlertLoop(ctx["redis"], get_context(ctx).engine, AlertConfig.from_settings(s), webhook)
    task = asyncio.create_task(loop.run(), name="flywheel-alerts")
    ctx[TASK_KEY] = (loop, task, http)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    held = ctx.pop(TASK_KEY, None)
    if held is None:
        return
    loop, task, http = held
    loop.stop()
    # A tick in progress finishes (its webhook deliveries included) within bounds.
    await finish(task, STOP_WAIT_S, "anomaly detection")
    if http is not None:
        await http.close()


FUNCTIONS: list[Any] = []
CRONS: list[Any] = []
