"""GET /v1/models and /v1/models/{id}: the routes, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import CallerDep, StateDep

router = APIRouter()


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "flywheel"}


@router.get("/v1/models", tags=["openai"])
async def list_models(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    """The routes this caller may use."""
    created = int(state.started_at)
    names = [n for n in state.router.names if caller.key is None or caller.key.allows(n)]
    return {"object": "list", "data": [_model(n, created) for n in names]}


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: str, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    state.router.route(model_id)  # raises model_not_found
    caller.check_route(model_id)
    return _model(model_id, int(state.started_at))
