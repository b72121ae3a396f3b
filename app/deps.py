"""Typed dependencies for the HTTP handlers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.state import AppState


async def get_state(request: Request) -> AppState:
    # async so FastAPI calls it inline instead of sending it to the thread pool.
    state: AppState = request.app.state.flywheel
    return state


def request_id(request: Request) -> str:
    rid: str = request.scope["state"]["request_id"]
    return rid


StateDep = Annotated[AppState, Depends(get_state)]
