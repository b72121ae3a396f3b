"""The snapshot file: `snapshot-<UTC time>.json.gz`, a manifest and the sections.

{"manifest": {format, version, id, created, prefix, counts, checksum}, "sections": {...}},
gzip-compressed. The checksum is the SHA-256 of the canonical JSON (sorted keys) of
everything but itself, so a file that was truncated, damaged or edited is refused, and
so is one that is not a Flywheel snapshot or that a newer version wrote. Every function
here blocks: callers run them in a thread.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from app.store.snapshot_sections import Plan, Section

FORMAT = "flywheel-snapshot"
VERSION = 1
SUFFIX = ".json.gz"
ID_RE = re.compile(r"snapshot-\d{8}T\d{12}Z")  # the UTC time to the microsecond
_ID_TIME = "snapshot-%Y%m%dT%H%M%S%fZ"
_GZIP_MAGIC = b"\x1f\x8b"


class SnapshotError(Exception):
    """A snapshot cannot be made, found or restored; the message says why."""

    code = "snapshot_error"


class SnapshotNotFound(SnapshotError):
    code = "snapshot_not_found"


class CorruptSnapshot(SnapshotError):
    """Truncated or damaged: the file is not what was written."""

    code = "snapshot_corrupt"


class ChecksumMismatch(CorruptSnapshot):
    code = "snapshot_checksum_mismatch"


class ForeignSnapshot(SnapshotError):
    """Not a Flywheel snapshot (or, for the warm-up, one another installation took)."""

    code = "snapshot_foreign"


class UnsupportedVersion(SnapshotError):
    code = "snapshot_version"


class IndexUnavailable(SnapshotError):
    """The database holding the index of snapshots cannot be reached."""

    code = "database_unavailable"


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated snapshot and the Redis commands that restore it."""

    manifest: dict[str, Any]
    plans: dict[str, Plan]
    ignored: list[str]


def snapshot_id(at: datetime) -> str:
    return at.astimezone(UTC).strftime(_ID_TIME)


def created_of(sid: str) -> datetime:
    return datetime.strptime(sid, _ID_TIME).replace(tzinfo=UTC)


def _checksum(manifest: dict[str, Any], sections: dict[str, Any]) -> str:
    body = {
        "manifest": {k: v for k, v in manifest.items() if k != "checksum"},
        "sections": sections,
    }
    return "sha256:" + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def write_file(
    directory: Path, manifest: dict[str, Any], sections: dict[str, Any]
) -> tuple[Path, int, str]:
    """Write a snapshot atomically: (path, size in bytes, checksum). Blocking."""
    checksum = _checksum(manifest, sections)
    doc = {"manifest": {**manifest, "checksum": checksum}, "sections": sections}
    data = gzip.compress(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS), compresslevel=6, mtime=0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{manifest['id']}{SUFFIX}"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{manifest['id']}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the whole file or none, never a partial one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return path, len(data), checksum


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The manifest and sections of a valid snapshot, or a SnapshotError. Blocking."""
    name = path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotNotFound(f"no snapshot file {path}") from None
    except OSError as e:
        raise SnapshotError(f"{name} cannot be read: {e.strerror}") from None
    if not raw.startswith(_GZIP_MAGIC):
        raise ForeignSnapshot(f"{name} is not a Flywheel snapshot (not gzip-compressed)")
    try:
        data = gzip.decompress(raw)
    except EOFError:
        raise CorruptSnapshot(
            f"{name} is truncated: its gzip stream ends early ({len(raw)} bytes)"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise CorruptSnapshot(f"{name} is corrupt (gzip: {e})") from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ForeignSnapshot(
            f"{name} is not a Flywheel snapshot (its content is not JSON)"
        ) from None
    manifest = doc.get("manifest") if isinstance(doc, dict) else None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or found != FORMAT:
        raise ForeignSnapshot(
            f"{name} is not a Flywheel snapshot (format {found!r}, not {FORMAT!r})"
        )
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptSnapshot(f"{name} has no valid version in its manifest")
    if version > VERSION:
        raise UnsupportedVersion(
            f"{name} was written by a newer Flywheel (snapshot version {version}); "
            f"this one reads versions up to {VERSION}"
        )
    sections = doc.get("sections")
    if not isinstance(sections, dict) or not all(isinstance(v, list) for v in sections.values()):
        raise CorruptSnapshot(f"{name} has no valid sections")
    actual = _checksum(manifest, sections)
    if manifest.get("checksum") != actual:
        raise ChecksumMismatch(
            f"{name} failed its checksum: the manifest says {manifest.get('checksum')}, "
            f"the content hashes to {actual}"
        )
    return manifest, sections


def load(
    path: Path, sections: tuple[Section, ...], prefix: str, now_ms: int, *, same_prefix: bool
) -> Loaded:
    """Validate a snapshot and plan its restore under `prefix`. Blocking."""
    manifest, stored = read_file(path)
    if same_prefix and manifest.get("prefix") != prefix:
        raise ForeignSnapshot(
            f"{path.name} was taken under Redis prefix {manifest.get('prefix')!r}, not {prefix!r}"
        )
    by_name = {s.name: s for s in sections}
    plans: dict[str, Plan] = {}
    for name, items in stored.items():
        section = by_name.get(name)
        if section is None:
            continue
        try:
            plans[name] = section.plan(prefix, items, now_ms)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptSnapshot(f"{path.name}: section {name!r} cannot be restored: {e}") from e
    return Loaded(manifest, plans, sorted(set(stored) - set(by_name)))
