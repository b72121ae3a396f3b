"""What files and batches share: rows that belong to a key, handed out detached, and
listed a page at a time by (created_at, id) after a cursor id, as OpenAI pages them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.store.schema import Batch, StoredFile

Row = TypeVar("Row", StoredFile, Batch)


def detached(engine: AsyncEngine) -> AsyncSession:
    # Rows are handed out detached, as plain values: nothing lazy-loads later.
    return AsyncSession(engine, expire_on_commit=False)


def owned_by(model: type[Row], owner: str | None) -> ColumnElement[bool]:
    """`owner` None is the master key (and anonymous callers where keys are optional)."""
    return model.owner.is_(None) if owner is None else model.owner == owner


async def page(
    engine: AsyncEngine,
    query: Select[Row],
    model: type[Row],
    *,
    owner: str | None,
    everyone: bool,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"] = "desc",
) -> tuple[list[Row], bool]:
    """A page of `query`'s rows the caller may see, in `order`, and whether more follow.
    `after` is the last id of the previous page; one the caller cannot see (or unknown)
    gives an empty page."""
    if not everyone:
        query = query.where(owned_by(model, owner))
    if after is not None:
        cursor = select(model.created_at).where(model.id == after)
        if not everyone:
            cursor = cursor.where(owned_by(model, owner))
        at = cursor.scalar_subquery()
        if order == "desc":
            query = query.where(
                or_(model.created_at < at, and_(model.created_at == at, model.id < after))
            )
        else:
            query = query.where(
                or_(model.created_at > at, and_(model.created_at == at, model.id > after))
            )
    if order == "desc":
        query = query.order_by(model.created_at.desc(), model.id.desc())
    else:
        query = query.order_by(model.created_at.asc(), model.id.asc())
    async with detached(engine) as s:
        rows: Sequence[Row] = (await s.scalars(query.limit(limit + 1))).all()
    return list(rows[:limit]), len(rows) > limit
