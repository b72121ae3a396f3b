"""Typed dependencies for the HTTP handlers."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import Caller, authenticate
from app.auth.session_revocation import api_session
from app.errors import AuthenticationError, PermissionDeniedError
from app.state import AppState


async def get_state(request: Request) -> AppState:
    # async so FastAPI calls it inline instead of sending it to the thread pool.
    state: AppState = request.app.state.flywheel
    return state


def request_id(request: Request) -> str:
    rid: str = request.scope["state"]["request_id"]
    return rid


StateDep = Annotated[AppState, Depends(get_state)]


async def require_admin(request: Request, state: StateDep) -> None:
    """Admin endpoints take the master key as a bearer token (or a dashboard session)."""
    master = state.settings.flywheel_master_key
    if master is None:
        raise PermissionDeniedError(
            "admin endpoints are off: set FLYWHEEL_MASTER_KEY", code="admin_disabled"
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(
        token.encode(), master.get_secret_value().encode()
    ):
        return
    if await api_session(state, request.headers):
        return  # the operator dashboard, logged in with the master key
    raise AuthenticationError("admin endpoints need the master key as a bearer token")


AdminDep = Depends(require_admin)


async def _caller(request: Request, state: StateDep) -> Caller:
    # A dependency, so a missing key is a 401 before any parameter is checked.
    return await authenticate(state, request.headers)


CallerDep = Annotated[Caller, Depends(_caller)]
