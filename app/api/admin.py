"""Admin endpoints (master key): the routing state and the cache operators act on."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from app.deps import AdminDep, StateDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.get("/cooldowns")
async def cooldowns(state: StateDep) -> dict[str, Any]:
    """Every deployment's circuit breaker, concurrency limit and Retry-After wait."""
    dispatcher = state.dispatcher
    return {
        "object": "list",
        "data": state.router.snapshot(),
        "hedges": {"started": dispatcher.hedges_started, "won": dispatcher.hedges_won},
    }


@router.post("/cache/prewarm")
async def cache_prewarm(
    state: StateDep, limit: int = Query(default=1000, ge=1, le=100_000)
) -> dict[str, Any]:
    """Load this replica's L1 with the most-hit answers still in L2."""
    return await state.cache.prewarm(limit)


@router.delete("/cache")
async def cache_purge(state: StateDep, route: str | None = None) -> dict[str, Any]:
    """Drop the cached answers of `route` (every route when absent), on every replica."""
    if route is not None:
        state.router.route(route)  # 404 model_not_found for a route that does not exist
    return {"route": route, **await state.cache.purge(route)}
