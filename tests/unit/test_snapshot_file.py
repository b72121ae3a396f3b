"""The snapshot file format and the sections' restore plans, without Redis or a database."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from app.cache.l2 import L2Cache
from app.routing.weights import breakers_key
from app.store.snapshot_file import (
    FORMAT,
    ID_RE,
    VERSION,
    ChecksumMismatch,
    CorruptSnapshot,
    ForeignSnapshot,
    SnapshotNotFound,
    UnsupportedVersion,
    created_of,
    load,
    read_file,
    snapshot_id,
    write_file,
)
from app.store.snapshot_sections import (
    CACHE_HOT,
    SECTIONS,
    CacheSection,
    KeysSection,
    encoding_for,
    from_text,
    to_text,
)

NOW_MS = 1_800_000_000_000
WEIGHTS = {
    "key": "weights:chat",
    "type": "hash",
    "enc": "utf8",
    "value": {"a": "0.25", "b": "0.75"},
    "expires_at_ms": None,
}


def manifest(**over: Any) -> dict[str, Any]:
    at = datetime(2026, 11, 21, 10, 15, 0, 123456, tzinfo=UTC)
    return {
        "format": FORMAT,
        "version": VERSION,
        "id": snapshot_id(at),
        "created": at.isoformat(),
        "prefix": "p:",
        "counts": {"routing_weights": 1},
        **over,
    }


def write(tmp_path: Path, sections: dict[str, Any] | None = None, **over: Any) -> Path:
    path, size, checksum = write_file(
        tmp_path, manifest(**over), sections or {"routing_weights": [WEIGHTS]}
    )
    assert size == path.stat().st_size
    assert checksum.startswith("sha256:")
    assert len(checksum) == 7 + 64
    return path


def test_ids_carry_the_utc_time() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    sid = snapshot_id(at)
    assert sid == "snapshot-20260102T030405678901Z"
    assert ID_RE.fullmatch(sid)
    assert created_of(sid) == at
    assert not ID_RE.fullmatch("../etc/passwd")


def test_written_atomically_and_read_back(tmp_path: Path) -> None:
    path = write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    read, sections = read_file(path)
    assert read["format"] == FORMAT
    assert read["checksum"].startswith("sha256:")
    assert sections == {"routing_weights": [WEIGHTS]}


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 4, 12):
        path.write_bytes(raw[:cut])
        with pytest.raises(CorruptSnapshot, match=r"truncated|corrupt"):
            read_file(path)


def test_an_edited_file_fails_its_checksum(tmp_path: Path) -> None:
    path = write(tmp_path)
    doc = orjson.loads(gzip.decompress(path.read_bytes()))
    doc["sections"]["routing_weights"][0]["value"]["a"] = "9"
    path.write_bytes(gzip.compress(orjson.dumps(doc)))
    with pytest.raises(ChecksumMismatch, match="checksum"):
        read_file(path)
    doc["sections"]["routing_weights"][0]["value"]["a"] = "0.25"
    doc["manifest"]["counts"] = {"routing_weights": 7}  # the manifest is covered too
    path.write_bytes(gzip.compress(orjson.dumps(doc)))
    with pytest.raises(ChecksumMismatch):
        read_file(path)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json.gz"
    plain.write_bytes(b'{"manifest": {}}')
    with pytest.raises(ForeignSnapshot, match="not gzip"):
        read_file(plain)
    plain.write_bytes(gzip.compress(b"hello, not json"))
    with pytest.raises(ForeignSnapshot, match="not JSON"):
        read_file(plain)
    plain.write_bytes(gzip.compress(orjson.dumps({"manifest": {"format": "redis-backup"}})))
    with pytest.raises(ForeignSnapshot, match="redis-backup"):
        read_file(plain)
    with pytest.raises(SnapshotNotFound):
        read_file(tmp_path / "missing.json.gz")


def test_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, version=VERSION + 1)
    with pytest.raises(UnsupportedVersion, match="newer Flywheel"):
        read_file(path)


def test_load_plans_every_item_before_anything_is_written(tmp_path: Path) -> None:
    bad = {**WEIGHTS, "key": "weights:x", "type": "hash", "value": []}
    path = write(tmp_path, {"routing_weights": [WEIGHTS, bad]})
    with pytest.raises(CorruptSnapshot, match="routing_weights"):
        load(path, SECTIONS, "q:", NOW_MS, same_prefix=False)
    good = write(tmp_path, {"routing_weights": [WEIGHTS], "from_the_future": []})
    loaded = load(good, SECTIONS, "q:", NOW_MS, same_prefix=False)
    assert loaded.plans["routing_weights"].commands[0] == ("DEL", "q:weights:chat")
    assert loaded.ignored == ["from_the_future"]
    with pytest.raises(ForeignSnapshot, match="prefix"):
        load(good, SECTIONS, "q:", NOW_MS, same_prefix=True)


def test_keys_section_keeps_absolute_expiry() -> None:
    section = KeysSection("cycle", "cycle:*")
    items = [
        {**WEIGHTS, "key": "cycle:a", "expires_at_ms": NOW_MS + 5000},
        {**WEIGHTS, "key": "cycle:gone", "expires_at_ms": NOW_MS - 1},
        {"key": "cycle:z", "type": "zset", "enc": "utf8", "value": [["m", 2.5]]},
        {"key": "cycle:l", "type": "list", "enc": "utf8", "value": ["x", "y"]},
    ]
    plan = section.plan("p:", items, NOW_MS)
    assert (plan.written, plan.expired) == (3, 1)
    assert ("PEXPIRE", "p:cycle:a", 5000) in plan.commands
    assert ("ZADD", "p:cycle:z", 2.5, b"m") in plan.commands
    assert ("RPUSH", "p:cycle:l", b"x", b"y") in plan.commands
    assert not any("p:cycle:gone" in c for c in plan.commands)


def test_cache_section_plan_and_binary_values() -> None:
    binary = b"z\x78\x9c\xff\x00"
    enc = encoding_for([binary])
    assert enc == "base64"
    assert from_text(to_text(binary, enc), enc) == binary
    items = [
        {"key": "cache:v1:r:1", "enc": enc, "value": to_text(binary, enc), "hits": 3.0}
        | {"expires_at_ms": NOW_MS + 60_000},
        {"key": "cache:v1:r:2", "enc": "utf8", "value": "j{}", "hits": 1.0}
        | {"expires_at_ms": NOW_MS},
    ]
    plan = CacheSection().plan("p:", items, NOW_MS)
    assert (plan.written, plan.expired) == (1, 1)
    assert plan.commands == [
        ("SET", "p:cache:v1:r:1", binary, "PX", 60_000),
        ("ZADD", "p:" + CACHE_HOT, 3.0, b"p:cache:v1:r:1"),
    ]


def test_section_keys_match_their_owners() -> None:
    l2 = L2Cache(Redis(), prefix="p:", timeout_s=0.1)  # no I/O: the client connects lazily
    assert l2.hot_key == "p:" + CACHE_HOT
    breakers = next(s for s in SECTIONS if s.name == "breakers")
    assert isinstance(breakers, KeysSection)
    assert "p:" + breakers.pattern == breakers_key("p:")
    # Gateways rewrite these within seconds of a Redis restart: no proof of learned state.
    assert breakers.probes == ()
    assert next(s for s in SECTIONS if s.name == "cache").probes == ()
    assert next(s for s in SECTIONS if s.name == "routing_weights").probes == ("weights:*",)
    assert {s.name for s in SECTIONS} >= {"routing_weights", "breakers", "cycle", "cache"}
