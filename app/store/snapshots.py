"""Snapshots of the learned state: `.json.gz` files with a manifest, indexed in the database.

`create` reads every section (`app.store.snapshot_sections`) from Redis and writes
`<dir>/snapshot-<UTC time>.json.gz` atomically (temp file, fsync, rename), indexes it in
the `snapshots` table and prunes beyond `keep`. Serialising, hashing, compressing and
file I/O run in a thread, never on the event loop. `restore` reads and validates the whole
file (`app.store.snapshot_file`) and plans every write before the first one reaches Redis,
then sends them in one MULTI/EXEC, so readers never see half a restore and a bad file
changes nothing. The file is the data; the table is the index that listings read, so a
snapshot written while the database was down is still found (by id, in the directory).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.store.schema import Snapshot
from app.store.snapshot_file import (
    FORMAT,
    ID_RE,
    SUFFIX,
    VERSION,
    IndexUnavailable,
    SnapshotNotFound,
    created_of,
    load,
    snapshot_id,
    write_file,
)
from app.store.snapshot_sections import SECTIONS, DumpContext, Section, glob_escape

log = logging.getLogger("flywheel.snapshots")


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: str
    created_at: datetime
    path: str
    size_bytes: int
    checksum: str
    version: int
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "snapshot",
            "created": self.created_at.isoformat().replace("+00:00", "Z"),
            "path": self.path,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            "version": self.version,
            "counts": self.counts,
        }


def _listdir(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        return {}
    out = {}
    for path in directory.glob(f"snapshot-*{SUFFIX}"):
        sid = path.name[: -len(SUFFIX)]
        if ID_RE.fullmatch(sid):
            out[sid] = path
    return out


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite drops the zone


def _info(row: Any) -> SnapshotInfo:
    return SnapshotInfo(
        id=row.id,
        created_at=_aware(row.created_at),
        path=row.path,
        size_bytes=row.size_bytes,
        checksum=row.checksum,
        version=row.version,
        counts=dict(row.counts or {}),
    )


async def list_snapshots(engine: AsyncEngine) -> list[SnapshotInfo]:
    """The indexed snapshots, newest first."""
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(*Snapshot.__table__.columns).order_by(Snapshot.created_at.desc())
            )
            return [_info(row) for row in rows]
    except (SQLAlchemyError, OSError) as e:
        raise IndexUnavailable(
            f"the snapshot index (database) is unavailable: {type(e).__name__}"
        ) from e


class Snapshots:
    """The snapshots of one installation: its Redis prefix, database and directory."""

    def __init__(
        self,
        redis: Redis,
        engine: AsyncEngine,
        *,
        directory: Path,
        prefix: str,
        keep: int = 10,
        cache_entries: int = 1000,
        sections: tuple[Section, ...] = SECTIONS,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.directory = directory
        self.prefix = prefix
        self.keep = keep
        self.cache_entries = cache_entries
        self.sections = sections

    @classmethod
    def from_settings(cls, settings: Settings, redis: Redis, engine: AsyncEngine) -> Snapshots:
        return cls(
            redis,
            engine,
            directory=settings.snapshot_dir,
            prefix=settings.flywheel_redis_prefix,
            keep=settings.flywheel_snapshot_keep,
            cache_entries=settings.flywheel_snapshot_cache_entries,
        )

    async def create(self) -> SnapshotInfo:
        """Write a snapshot of the learned state now, index it, prune the oldest."""
        now = datetime.now(UTC)
        sid = snapshot_id(now)
        ctx = DumpContext(self.prefix, int(now.timestamp() * 1000), self.cache_entries)
        sections = {s.name: await s.dump(self.redis, ctx) for s in self.sections}
        counts = {name: len(items) for name, items in sections.items()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "id": sid,
            "created": now.isoformat().replace("+00:00", "Z"),
            "prefix": self.prefix,
            "counts": counts,
        }
        path, size, checksum = await asyncio.to_thread(
            write_file, self.directory, manifest, sections
        )
        info = SnapshotInfo(sid, now, str(path), size, checksum, VERSION, counts)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(Snapshot).values(
                        id=sid,
                        created_at=now,
                        path=str(path),
                        size_bytes=size,
                        checksum=checksum,
                        version=VERSION,
                        counts=info.counts,
                    )
                )
        except (SQLAlchemyError, OSError) as e:
            # The file is the data: it is kept, and restorable by id from the directory.
            log.warning("snapshot %s written but not indexed: %s", sid, type(e).__name__)
        log.info("snapshot %s written (%d bytes, %s)", sid, size, info.counts)
        await self.prune()
        return info

    async def listing(self) -> list[SnapshotInfo]:
        return await list_snapshots(self.engine)

    async def known(self) -> dict[str, Path]:
        """Every snapshot id this host can find, newest first: the index and the directory."""
        indexed: dict[str, Path] = {}
        try:
            indexed = {s.id: Path(s.path) for s in await self.listing()}
        except IndexUnavailable as e:
            log.warning("%s; using the snapshot directory alone", e)
        files = await asyncio.to_thread(_listdir, self.directory)
        merged = {**indexed, **files}  # this host's copy first: the index may name another's
        return {sid: merged[sid] for sid in sorted(merged, reverse=True)}

    async def newest(self) -> datetime | None:
        known = await self.known()
        return created_of(next(iter(known))) if known else None

    async def due(self, interval: timedelta) -> bool:
        newest = await self.newest()
        return newest is None or datetime.now(UTC) - newest >= interval

    async def prune(self) -> list[str]:
        """Delete the files and index rows of all but the newest `keep` snapshots."""
        known = await self.known()
        drop = list(known)[self.keep :]
        if not drop:
            return []
        await asyncio.to_thread(_unlink, [known[sid] for sid in drop])
        try:
            async with self.engine.begin() as conn:
                await conn.execute(delete(Snapshot).where(Snapshot.id.in_(drop)))
        except (SQLAlchemyError, OSError) as e:
            log.warning("pruned snapshot rows not deleted: %s", type(e).__name__)
        log.info("pruned %d snapshot(s): %s", len(drop), ", ".join(drop))
        return drop

    async def locate(self, target: str, *, allow_path: bool = False) -> Path:
        """The file of a snapshot id; with `allow_path` (the CLI), a path as well."""
        if ID_RE.fullmatch(target):
            path = (await self.known()).get(target)
            if path is None:
                raise SnapshotNotFound(f"no snapshot {target} in the index or {self.directory}")
            return path
        if allow_path:
            return Path(target)
        raise SnapshotNotFound(f"{target!r} is not a snapshot id (snapshot-<UTC time>Z)")

    async def restore(
        self, target: str, *, allow_path: bool = False, same_prefix: bool = False
    ) -> dict[str, Any]:
        """Validate the whole snapshot, then write it to Redis in one transaction.

        `same_prefix` refuses a snapshot another installation (Redis prefix) took: for
        the automatic warm-up, which must not pick up a neighbour's state.
        """
        path = await self.locate(target, allow_path=allow_path)
        now_ms = int(time.time() * 1000)
        loaded = await asyncio.to_thread(
            functools.partial(load, same_prefix=same_prefix),
            path,
            self.sections,
            self.prefix,
            now_ms,
        )
        commands = [c for plan in loaded.plans.values() for c in plan.commands]
        if commands:
            async with self.redis.pipeline(transaction=True) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                await pipe.execute()
        manifest = loaded.manifest
        restored = {name: plan.written for name, plan in loaded.plans.items()}
        log.info("snapshot %s restored: %s", manifest.get("id"), restored)
        if loaded.ignored:
            log.warning("snapshot sections this version does not know: %s", loaded.ignored)
        return {
            "id": manifest.get("id"),
            "created": manifest.get("created"),
            "checksum": manifest.get("checksum"),
            "restored": restored,
            "expired": {name: plan.expired for name, plan in loaded.plans.items()},
            "ignored_sections": loaded.ignored,
        }

    async def holds_state(self) -> bool:
        """Does Redis hold any of the learned state? (One key of any section is enough.)"""
        probes = [p for s in self.sections for p in s.probes]
        exact = [p for p in probes if not any(c in p for c in "*?[")]
        if exact and await self.redis.exists(*(self.prefix + p for p in exact)):
            return True
        for pattern in (p for p in probes if p not in exact):
            match = glob_escape(self.prefix) + pattern
            async for _ in self.redis.scan_iter(match=match, count=1000):
                return True
        return False
