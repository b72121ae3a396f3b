"""GET /admin/alerts (master key): the anomalies the workers raised, newest first.

Read from the database within a short timeout: a database that does not answer is a
503, never a hang.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.deps import AdminDep, StateDep
from app.errors import ServiceUnavailableError
from app.observability.anomaly import Kind
from app.store.alerts import list_alerts
from app.store.db import DB_ERRORS

router = APIRouter(prefix="/admin/alerts", tags=["admin"], dependencies=[AdminDep])

READ_TIMEOUT_S = 3.0


@router.get("")
async def get_alerts(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    kind: Annotated[Kind | None, Query(description="only alerts of this kind")] = None,
    subject: Annotated[
        str | None, Query(max_length=260, description='only this "route/deployment"')
    ] = None,
    since: Annotated[
        datetime | None,
        Query(description="only alerts raised at or after this time (ISO 8601; UTC if naive)"),
    ] = None,
    open_only: Annotated[
        bool,
        Query(
            alias="open",
            description="only open alerts: raised within the cooldown (FLYWHEEL_ALERT_COOLDOWN_S)",
        ),
    ] = False,
) -> dict[str, Any]:
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    cooldown_s = state.settings.flywheel_alert_cooldown_s
    if open_only:
        # An alert stays open while its cooldown holds back repeats of it.
        opened = datetime.now(UTC) - timedelta(seconds=cooldown_s)
        since = opened if since is None else max(since, opened)
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            data = await list_alerts(
                state.engine, limit=limit, kind=kind, subject=subject, since=since
            )
    except DB_ERRORS as e:
        raise ServiceUnavailableError(
            f"alerts are unavailable: the database did not answer ({type(e).__name__})",
            code="database_unavailable",
        ) from e
    return {"object": "list", "data": data, "cooldown_s": cooldown_s}
