"""Removing expired files: their rows, then their bytes. For a worker's periodic job."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from app.files.storage import FileStorage
from app.store.files import FileInUse, delete_file, expired_files

log = logging.getLogger("flywheel.files")

# Temporary files of uploads older than this were left by a crash (an upload of the
# largest file allowed takes minutes, not hours).
STALE_TEMP_S = 6 * 3600


async def prune_expired(
    engine: AsyncEngine, storage: FileStorage, now: datetime, limit: int = 500
) -> int:
    """Delete up to `limit` files expired by `now`, and stale temporary files; the
    number of files deleted. Each row goes before its bytes: a crash in between leaves
    bytes that no row names (unreachable, harmless), never a listed file without bytes.
    Database errors propagate (the caller's next run retries)."""
    deleted = 0
    for row in await expired_files(engine, now, limit):
        try:
            if not await delete_file(engine, row.id):
                continue  # deleted meanwhile, by its owner or another pruner
        except FileInUse:
            continue  # a batch started reading it since the query
        deleted += 1
        try:
            await asyncio.to_thread(storage.delete, row.id)
        except OSError as e:
            log.warning("expired file %s: its row is gone, its bytes stay: %s", row.id, e)
    try:
        await asyncio.to_thread(storage.sweep_temps, STALE_TEMP_S)
    except OSError as e:
        log.warning("files: sweeping temporary files failed: %s", e)
    return deleted
