"""The per-key limiter: Redis when it answers, this process's share when it does not.

Every Redis call is bounded by the client's socket timeout; after a failure Redis is
left alone for `RETRY_S` (requests meanwhile go straight to the fallback), then tried
again. Each route chooses what an outage means: enforce this replica's share locally
(the default) or refuse ("closed"). Either way the outage is logged once, its recovery
once, and every decision taken without Redis is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.ratelimit.local_window import LocalWindow
from app.ratelimit.quota import Ask, Decision, Quota, Ticket, to_nano
from app.ratelimit.redis_window import RedisWindow

log = logging.getLogger("flywheel.limits")
RETRY_S = 1.0
OnRedisDown = Literal["local", "closed"]
# Unreachable or too slow: an outage. Any other Redis error is a bug of ours, answered
# locally for that request without declaring Redis down.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class Limiter:
    def __init__(self, redis: Redis | None, prefix: str, replicas: int) -> None:
        self._redis = RedisWindow(redis, prefix) if redis is not None else None
        self.local = LocalWindow(replicas)
        self._down_until = 0.0
        self.redis_up = redis is not None
        self.decisions: Counter[str] = Counter()  # allowed, or the refusal
        self.degraded: Counter[str] = Counter()  # decisions taken without Redis, by mode
        self.settle_failures = 0
        self._settling: set[asyncio.Task[None]] = set()

    async def reserve(self, quota: Quota, ask: Ask, on_redis_down: OnRedisDown) -> Decision:
        decision = await self._decide(quota, ask, on_redis_down)
        self.decisions["allowed" if decision.allowed else str(decision.refusal)] += 1
        return decision

    async def _decide(self, quota: Quota, ask: Ask, on_redis_down: OnRedisDown) -> Decision:
        if self._redis is not None and time.monotonic() >= self._down_until:
            try:
                decision, spent = await self._redis.reserve(quota, ask)
            except _REDIS_DOWN as e:
                self._went_down(e)
            except RedisError:
                log.exception("rate limits: the reserve script failed; decided locally")
            else:
                self._came_back()
                if spent is not None:
                    self.local.remember_spent(quota.key_id, quota.period, spent)
                return decision
        self.degraded[on_redis_down] += 1
        if on_redis_down == "closed":
            return Decision(False, "unavailable", RETRY_S)
        return self.local.reserve(quota, ask)

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float | None) -> None:
        """Move the reservation to the real usage (in the background: Redis, not the
        client, waits for it). A cost of None is unknown: the reserved cost stands."""
        token_delta = tokens - ticket.tokens if ticket.counts_tokens else 0
        cost_delta = 0
        if ticket.counts_cost and cost_usd is not None:
            cost_delta = to_nano(cost_usd) - ticket.cost_nano
        if not token_delta and not cost_delta:
            return
        if ticket.local or self._redis is None:
            self.local.settle(ticket, token_delta, cost_delta)
            return
        task = asyncio.get_running_loop().create_task(self._settle(ticket, token_delta, cost_delta))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, ticket: Ticket, token_delta: int, cost_delta: int) -> None:
        assert self._redis is not None
        try:
            await self._redis.settle(ticket, token_delta, cost_delta)
        except _REDIS_DOWN as e:
            # The reservation stands as estimated: the key is charged what was reserved.
            self.settle_failures += 1
            self._went_down(e)
        except RedisError:
            self.settle_failures += 1
            log.exception("rate limits: the settle script failed; the estimate stands")

    async def drain(self) -> None:
        """Wait for settlements under way (shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _went_down(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_S
        if self.redis_up:
            self.redis_up = False
            log.warning(
                "rate limits: Redis unreachable (%s); each replica now enforces its share "
                "(limit / %d) locally, or refuses where the route says closed",
                type(error).__name__,
                self.local.replicas,
            )

    def _came_back(self) -> None:
        if not self.redis_up:
            self.redis_up = True
            log.warning("rate limits: Redis reachable again; limits are global once more")
