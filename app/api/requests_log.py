"""GET /admin/requests (master key): the recorded requests, newest first, filtered and
paged by an opaque cursor; GET /admin/requests/{id}: one in full, with its kept bodies
and its feedback.

Requests are recorded asynchronously: one shows up here once the workers have
consolidated it (seconds). A filter the indexes cannot serve looks at a bounded number
of rows per page (see `app.store.request_log`), so a page may hold fewer rows than asked
for, even none, with `has_more` and a `next_cursor` to go on from. The database is read
within a short timeout: one that does not answer is a 503, never a hang.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query

from app.api.cycle import read_db
from app.deps import AdminDep, StateDep
from app.errors import InvalidRequestError, NotFoundError
from app.store.request_log import (
    ID_PATTERN,
    LogFilter,
    LogQueryError,
    decode_cursor,
    get_request,
    list_requests,
)

router = APIRouter(prefix="/admin/requests", tags=["admin"], dependencies=[AdminDep])

Cache = Literal["hit-l1", "hit-l2", "miss", "bypass"]
Quality = Literal["scored", "unscored", "low"]
Name = Annotated[str | None, Query(max_length=128)]
When = Annotated[datetime | None, Query(description="ISO 8601; UTC if naive")]


@router.get("")
async def list_log(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=256, description="the previous page's next_cursor")
    ] = None,
    route: Name = None,
    deployment: Name = None,
    key_id: Annotated[str | None, Query(max_length=64)] = None,
    model: Name = None,
    status: Annotated[
        str | None,
        Query(max_length=8, description='"ok", "error", a class ("5xx") or a code ("429")'),
    ] = None,
    cache: Annotated[Cache | None, Query(description="the cache tier that answered")] = None,
    quality: Annotated[Quality | None, Query()] = None,
    quality_below: Annotated[
        float | None, Query(ge=0.0, le=1.0, description='"low" is below this (0.85)')
    ] = None,
    since: When = None,
    until: When = None,
) -> dict[str, Any]:
    """Requests newest first; `since` is inclusive, `until` exclusive."""
    try:
        f = LogFilter(
            route=route,
            deployment=deployment,
            key_id=key_id,
            model=model,
            status=status,
            cache=cache,
            quality=quality,
            quality_below=quality_below,
            since=since,
            until=until,
        )
        at = None if cursor is None else decode_cursor(cursor)
        f.residual()  # checked before the database is asked
    except LogQueryError as e:
        raise InvalidRequestError(str(e), param=e.param, code="invalid_value") from e
    page = await read_db("the request log is", lambda: list_requests(state.engine, f, at, limit))
    return {
        "object": "list",
        "data": page.data,
        "has_more": page.has_more,
        "next_cursor": page.next_cursor,
        "scanned_to": None if page.scanned_to is None else page.scanned_to.isoformat(),
    }


@router.get("/{request_id}")
async def get_one(
    state: StateDep,
    request_id: Annotated[str, Path(max_length=64, pattern=ID_PATTERN)],
) -> dict[str, Any]:
    """One request: every column, its bodies while kept (else null), its feedback."""
    now = datetime.now(UTC)
    found = await read_db("the request log is", lambda: get_request(state.engine, request_id, now))
    if found is None:
        raise NotFoundError(
            f"no recorded request {request_id} (requests show up once the workers have "
            "recorded them, seconds after they end)",
            code="request_not_found",
        )
    return found
