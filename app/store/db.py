"""The database engine, and the start-up check that the schema is the one we expect."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.store.schema import SCHEMA_REVISION

log = logging.getLogger("flywheel.store")


# What a database that is down, unreachable or too slow raises through SQLAlchemy.
DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


class SchemaMismatchError(RuntimeError):
    """The database is at another migration than this code expects."""


def make_engine(dsn: str) -> AsyncEngine:
    if dsn.startswith("sqlite"):
        path = dsn.split(":///", 1)[1] if ":///" in dsn else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return create_async_engine(dsn, connect_args={"timeout": 5})
    return create_async_engine(
        dsn,
        pool_size=5,
        max_overflow=5,
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args={"timeout": 5, "command_timeout": 10},
    )


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        try:
            row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
        except SQLAlchemyError:
            return None
    return None if row is None else str(row[0])


async def check_schema(engine: AsyncEngine) -> bool:
    """True when the schema matches; False when the database cannot be reached.

    A reachable database at the wrong revision raises: serving against it would corrupt
    data, while an unreachable one only degrades (requests never need the database).
    """
    try:
        revision = await current_revision(engine)
    except (SQLAlchemyError, OSError) as e:
        log.warning("database unreachable at start-up, running degraded: %s", type(e).__name__)
        return False
    if revision != SCHEMA_REVISION:
        raise SchemaMismatchError(
            f"database schema is at {revision or 'no revision'}, this code needs "
            f"{SCHEMA_REVISION}: run `flywheel migrate` (alembic upgrade head) first"
        )
    return True
