"""GET /metrics: Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics), media_type=CONTENT_TYPE_LATEST)
