"""Migrations and models agree, on SQLite and (when it runs here) PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from app.cli import migrate
from app.store.db import check_schema, current_revision, make_engine
from app.store.schema import SCHEMA_REVISION, Base
from tests.conftest import PG_ADMIN, _tcp_open


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "render_as_batch": True}
    )
    return list(compare_metadata(context, Base.metadata))


async def _upgraded_diff(url: str) -> tuple[list[Any], set[str]]:
    await asyncio.to_thread(migrate, url)
    engine = make_engine(url)
    try:
        assert await current_revision(engine) == SCHEMA_REVISION
        assert await check_schema(engine) is True
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    return diff, tables


async def test_sqlite_upgrade_matches_models(tmp_path: Path) -> None:
    diff, tables = await _upgraded_diff(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    assert diff == []
    wanted = {"requests", "request_bodies", "feedback", "metrics_points", "snapshots", "api_keys"}
    assert wanted <= tables


async def test_postgres_upgrade_matches_models() -> None:
    if not _tcp_open("127.0.0.1", 5432):
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (the SQLite test still runs)")
    import asyncpg

    name = f"fwmig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN, timeout=5)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        diff, tables = await _upgraded_diff(f"postgresql+asyncpg://127.0.0.1:5432/{name}")
        assert diff == []
        assert "requests" in tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
