"""A route's variant plan, from what the database says, published to Redis.

The database is the truth (experiments and variants); the Redis plan is what gateways
apply. Whoever changes an experiment or a variant republishes the route's plan, and
every cycle run republishes all of them, so a Redis that lost its data heals within
one run.

- a running experiment: its arms with their shares;
- else a promoted variant (watched or kept): all traffic gets it;
- else no plan: requests go as clients send them.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cycle.variants import BASELINE, VariantArm, VariantPlan, publish_plan
from app.store.experiments import get_variant, list_experiments, promoted_variant


def _arm(variant: dict[str, Any] | None, name: str, share: float) -> VariantArm:
    if variant is None:  # the baseline: the client's own prompt
        return VariantArm(variant=name, share=share)
    return VariantArm(
        variant=name,
        share=share,
        system_prompt=variant["system_prompt"],
        params=variant["params"] or {},
    )


async def plan_of(engine: AsyncEngine, route: str) -> VariantPlan | None:
    version = int(time.time() * 1000)  # later publications carry larger versions
    for running in await list_experiments(engine, route, ("running",), limit=1):
        arms = []
        for name, share in running["arms"].items():
            variant = None if name == BASELINE else await get_variant(engine, name)
            arms.append(_arm(variant, name, float(share)))
        return VariantPlan(version, running["id"], tuple(arms))
    promoted = await promoted_variant(engine, route)
    if promoted is not None:
        return VariantPlan(version, None, (_arm(promoted, promoted["id"], 1.0),))
    return None


async def publish_route(engine: AsyncEngine, redis: Redis, prefix: str, route: str) -> None:
    await publish_plan(redis, prefix, route, await plan_of(engine, route))
