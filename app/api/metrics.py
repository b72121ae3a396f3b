"""GET /metrics (Prometheus exposition) and GET /metrics/cache (the cache, as JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/cache")
async def cache_metrics(state: StateDep) -> dict[str, Any]:
    """Per tier: hits, misses, hit rate and hit latency; L1 size and evictions; L2 health."""
    return state.cache.snapshot()
