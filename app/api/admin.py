"""Admin endpoints (master key): the routing state operators act on."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

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
