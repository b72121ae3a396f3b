"""Files (`/v1/files`) in the database, and their OpenAI wire shape. Their bytes are in
the files directory (`app.files.storage`); a row is inserted only once its bytes are in
place, and deleted before them, so a row never names bytes that were never written.

Visibility is the API's: these functions take an owner (a key id, None for the master
key) and whether the caller sees everyone's files. Expired files are left out of lists
here and refused by the API until the pruner (`app.files.prune`) removes them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from app.store.metrics_history import as_utc
from app.store.owned import detached, page
from app.store.schema import Batch, StoredFile

# A batch in one of these states still reads its input file: the file cannot go.
BUSY = ("validating", "in_progress", "finalizing", "cancelling")


class FileInUse(Exception):
    """The file is the input of a batch that is still running."""


def _unix(ts: datetime | None) -> int | None:
    return None if ts is None else int(as_utc(ts).timestamp())


def file_object(row: StoredFile) -> dict[str, Any]:
    """The file as OpenAI's API shows it."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": _unix(row.created_at),
        "expires_at": _unix(row.expires_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": None,
    }


def is_expired(row: StoredFile, now: datetime) -> bool:
    return row.expires_at is not None and as_utc(row.expires_at) <= now


async def add_file(
    engine: AsyncEngine,
    *,
    file_id: str,
    owner: str | None,
    purpose: str,
    filename: str,
    size: int,
    lines: int,
    expires_at: datetime | None,
    created_at: datetime | None = None,
) -> StoredFile:
    row = StoredFile(
        id=file_id,
        owner=owner,
        purpose=purpose,
        filename=filename,
        bytes=size,
        lines=lines,
        status="processed",
        created_at=created_at or datetime.now(UTC),
        expires_at=expires_at,
    )
    async with detached(engine) as session, session.begin():
        session.add(row)
    return row


async def get_file(engine: AsyncEngine, file_id: str) -> StoredFile | None:
    """The row of `file_id`, expired or not, whoever owns it."""
    async with detached(engine) as session:
        return await session.get(StoredFile, file_id)


def _busy(file_id: Any) -> ColumnElement[bool]:
    return exists().where(Batch.input_file_id == file_id, Batch.status.in_(BUSY))


async def list_files(
    engine: AsyncEngine,
    *,
    owner: str | None,
    everyone: bool,
    now: datetime,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> tuple[list[StoredFile], bool]:
    """A page of the unexpired files by (created_at, id) in `order`, and whether more
    follow. `after` is the last id of the previous page; one the caller cannot see (or
    unknown) gives an empty page."""
    f = StoredFile
    query = select(f).where(or_(f.expires_at.is_(None), f.expires_at > now))
    if purpose is not None:
        query = query.where(f.purpose == purpose)
    return await page(
        engine, query, f, owner=owner, everyone=everyone, after=after, limit=limit, order=order
    )


async def delete_file(engine: AsyncEngine, file_id: str) -> bool:
    """Delete the row of `file_id` unless a running batch reads it (`FileInUse`, the
    row is kept); False if there was none. One statement, so a batch that starts
    meanwhile is seen (PostgreSQL re-checks on conflict; SQLite serialises writers)."""
    async with detached(engine) as session, session.begin():
        result = await session.execute(
            delete(StoredFile)
            .where(StoredFile.id == file_id, ~_busy(file_id))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if await session.get(StoredFile, file_id) is not None:
            raise FileInUse(file_id)
    return False


async def expired_files(engine: AsyncEngine, now: datetime, limit: int) -> list[StoredFile]:
    """Up to `limit` files expired by `now`, longest expired first, for the pruner;
    not those a running batch still reads (they go once it is over)."""
    f = StoredFile
    query = (
        select(f)
        .where(f.expires_at.is_not(None), f.expires_at <= now, ~_busy(f.id))
        .order_by(f.expires_at.asc(), f.id.asc())
        .limit(limit)
    )
    async with detached(engine) as session:
        return list((await session.scalars(query)).all())
