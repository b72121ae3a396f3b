"""GET /v1/virtuous-cycle/datasets (master key): a route's best answers as a fine-tuning
file, in OpenAI's chat format (JSONL, one example per line; see `app.cycle.finetune`).

Only routes that store bodies have anything to export (`bodies: {store: true}`; the
bodies were redacted before they were stored). The export streams: the database is
read a page at a time by (created_at, id), each page turned into lines in a thread (JSON
work on large bodies must not stall the loop), so neither memory nor a single query
grows with the export. The first page is read before the response starts, so a database
that does not answer is a 503 like every other cycle endpoint; one that fails later can
only end the stream early (the status is sent), which the log records.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Query
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import StreamingResponse

from app.api.cycle import READ_TIMEOUT_S, read_db
from app.cycle.finetune import example
from app.deps import AdminDep, StateDep
from app.errors import NotFoundError
from app.store.datasets import PairFilter, StoredPair, pairs_page
from app.store.db import DB_ERRORS

router = APIRouter(prefix="/v1/virtuous-cycle", tags=["virtuous-cycle"], dependencies=[AdminDep])

log = logging.getLogger("flywheel.cycle")

PAGE_SIZE = 500  # pairs per database read (bodies can be tens of kB each)
MEDIA_TYPE = "application/jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@router.get("/datasets", response_class=StreamingResponse)
async def dataset(
    state: StateDep,
    route: Annotated[str, Query(min_length=1, max_length=128)],
    min_quality: Annotated[float, Query(ge=0, le=1)] = 0.9,
    limit: Annotated[int, Query(ge=1, le=100_000, description="at most this many examples")] = 1000,
    since: Annotated[
        datetime | None, Query(description="only answers given at or after (UTC if naive)")
    ] = None,
) -> StreamingResponse:
    """Stored answers of `route` scored at least `min_quality`, oldest first, as JSONL
    training examples; pairs that cannot form a valid example are skipped."""
    if route not in state.router.routes:
        raise NotFoundError(f"no route {route!r}", param="route", code="route_not_found")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    f = PairFilter(route, min_quality, datetime.now(UTC), since)
    size = min(PAGE_SIZE, limit)
    first = await read_db("stored bodies", lambda: pairs_page(state.engine, f, None, size))
    name = _UNSAFE.sub("_", route)
    return StreamingResponse(
        _lines(state.engine, f, first, size, limit),
        media_type=MEDIA_TYPE,
        headers={
            "content-disposition": f'attachment; filename="{name}-finetune.jsonl"',
            "cache-control": "no-store",
        },
    )


async def _lines(
    engine: AsyncEngine, f: PairFilter, page: list[StoredPair], size: int, limit: int
) -> AsyncIterator[bytes]:
    """Each page's examples as one chunk, until `limit` examples or the last page."""
    sent = 0
    while page:
        lines = (await asyncio.to_thread(_encode, page))[: limit - sent]
        if lines:
            yield b"".join(lines)
        sent += len(lines)
        if sent >= limit or len(page) < size:
            return
        after = page[-1].cursor
        size = min(PAGE_SIZE, limit - sent)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                page = await pairs_page(engine, f, after, size)
        except DB_ERRORS as e:
            log.warning(
                "dataset export of route %s ended early after %d examples: %s",
                f.route,
                sent,
                type(e).__name__,
            )
            return


def _encode(page: list[StoredPair]) -> list[bytes]:
    out: list[bytes] = []
    for pair in page:
        try:
            request = orjson.loads(pair.request or "null")
            response = orjson.loads(pair.response or "null")
        except orjson.JSONDecodeError:
            continue
        found = example(request, response)
        if found is not None:
            out.append(orjson.dumps(found) + b"\n")
    return out
