"""The operator dashboard at /dashboard: master-key login, then a page that reads the API.

Only the login page and what it needs are served to anyone; every other file (the page,
its scripts) wants a valid session, so a wrong key opens nothing: the page redirects to
the login, a script answers 401. The session is a signed cookie (`app.auth.session`),
and the data the page shows comes from the public endpoints, which accept it beside the
dashboard's header. The files are small and read once, at import: serving one is a
dictionary lookup, no disk I/O on the event loop.
"""

from __future__ import annotations

import logging
import mimetypes
import secrets
import time
from types import MappingProxyType
from typing import Annotated

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from app.auth.session import COOKIE, issue
from app.auth.session_revocation import log_out, page_session
from app.dashboard import STATIC_DIR
from app.deps import StateDep
from app.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from app.state import AppState

log = logging.getLogger("flywheel.auth")

router = APIRouter(prefix="/dashboard", include_in_schema=False)

# What a browser may load before logging in: the login page, its script and the style.
PUBLIC = frozenset({"login.html", "login.js", "dashboard.css"})
HEADERS = MappingProxyType(
    {
        # Scripts and styles only from the gateway itself; no inline script, no framing.
        "Content-Security-Policy": (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
)


def _load() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if path.suffix == ".js":
                kind = "text/javascript"  # some systems' tables say application/javascript
            files[path.relative_to(STATIC_DIR).as_posix()] = (path.read_bytes(), kind)
    return files


FILES = MappingProxyType(_load())


def _file(name: str) -> Response:
    body, kind = FILES[name]
    charset = "; charset=utf-8" if kind.startswith("text/") else ""
    return Response(body, media_type=kind + charset, headers=dict(HEADERS))


async def logged_in(request: Request, state: AppState) -> bool:
    return await page_session(state, request.headers)


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: SecretStr = Field(min_length=1, max_length=512)


@router.get("")
async def root() -> Response:
    return RedirectResponse("/dashboard/", status_code=303)


@router.get("/login")
async def login_page() -> Response:
    return _file("login.html")


@router.post("/login")
async def login(request: Request, state: StateDep, body: Annotated[Login, Body()]) -> Response:
    """Trade the master key for a session cookie (204), or 401; 10 tries a minute."""
    state.http_limits.check_login(request.scope)
    master = state.settings.flywheel_master_key
    if master is None:
        raise PermissionDeniedError(
            "the dashboard is off: set FLYWHEEL_MASTER_KEY", code="admin_disabled"
        )
    given = body.key.get_secret_value().encode()
    if not secrets.compare_digest(given, master.get_secret_value().encode()):
        client = request.client.host if request.client else "unknown"
        log.warning("dashboard login refused from %s", client)  # never what was typed
        raise AuthenticationError("that is not the master key", code="invalid_api_key")
    ttl = state.settings.flywheel_dashboard_session_s
    token = issue(master, time.time(), ttl)
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        COOKIE,
        token,
        max_age=ttl,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, state: StateDep) -> Response:
    """Ends the session on every replica (recorded in Redis until it would have
    expired), and clears the cookie."""
    await log_out(state, request.headers)
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/")
async def page(request: Request, state: StateDep) -> Response:
    if not await logged_in(request, state):
        return RedirectResponse("/dashboard/login", status_code=303)
    return _file("index.html")


@router.get("/{name:path}")
async def asset(
    request: Request, state: StateDep, name: Annotated[str, Path(max_length=200)]
) -> Response:
    """A file of the dashboard: by name from the files read at start-up, never a path
    on disk, so `..` and the like find nothing."""
    if name not in FILES:
        raise NotFoundError(f"no dashboard file {name[:100]!r}", code="not_found")
    if name not in PUBLIC and not await logged_in(request, state):
        raise AuthenticationError("log in to the dashboard first", code="invalid_session")
    return _file(name)
