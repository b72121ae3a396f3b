"""Stored request/answer pairs for dataset export, a page at a time.

Pairs are the bodies kept for routes that store them (`request_bodies`, redacted before
they were written) joined to their request rows: successful chat completions of one
route scored at least `min_quality`, whose bodies have not expired. Pages follow
(created_at, id) from a cursor, so an export of any size holds one page in memory and
each page is an index range scan on (route, created_at), never an OFFSET.

Cache hits are left out: their answer is a copy of one already exported (or expired),
and a duplicated example weighs twice in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.cycle_evidence import CHAT
from app.store.schema import RequestBody, RequestRow

Cursor = tuple[datetime, str]  # the last pair's (created_at, id)


@dataclass(frozen=True, slots=True)
class PairFilter:
    route: str
    min_quality: float
    now: datetime  # bodies that expire before this are gone, whatever pruning did yet
    since: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredPair:
    id: str
    created_at: datetime
    request: str | None
    response: str | None

    @property
    def cursor(self) -> Cursor:
        return self.created_at, self.id


async def pairs_page(
    engine: AsyncEngine, f: PairFilter, after: Cursor | None, size: int
) -> list[StoredPair]:
    """Up to `size` pairs after the cursor, oldest first."""
    r, b = RequestRow, RequestBody
    query = (
        select(r.id, r.created_at, b.request, b.response)
        .join(b, b.request_id == r.id)
        .where(
            r.route == f.route,
            r.status == 200,
            r.endpoint == CHAT,
            r.quality_score >= f.min_quality,
            r.cache_tier.not_in(("hit-l1", "hit-l2")),
            b.expires_at > f.now,
        )
        .order_by(r.created_at, r.id)
        .limit(size)
    )
    if f.since is not None:
        query = query.where(r.created_at >= f.since)
    if after is not None:
        at, last = after
        query = query.where(or_(r.created_at > at, and_(r.created_at == at, r.id > last)))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [StoredPair(row.id, row.created_at, row.request, row.response) for row in rows]
