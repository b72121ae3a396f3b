"""The HTTP-level limits (slowapi) do no I/O on the event loop: their storage is in
memory whatever the environment says, and a check opens no socket and no file."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import pytest
from limits.storage import MemoryStorage

from app.api.http_limits import HttpLimits, LoopMemoryStorage
from app.config import Settings

# Audit events that mean I/O: connecting or binding a socket, resolving a name,
# sending a datagram, opening a file, spawning a process.
IO_EVENTS = ("socket.", "open", "os.", "subprocess.", "shutil.")
_seen: list[str] = []
_watching = False
_loop_thread = threading.get_ident()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # The event loop's thread only: a thread another test left behind (a server's,
    # a driver's) may open files meanwhile, which says nothing of the limit checks.
    if _watching and event.startswith(IO_EVENTS) and threading.get_ident() == _loop_thread:
        _seen.append(event)


sys.addaudithook(_audit)  # hooks cannot be removed: it only records while `_watching`


def _scope(path: str, ip: str = "10.0.0.1") -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "client": (ip, 5000)}


def test_storage_is_memory_whatever_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATELIMIT_STORAGE_URI", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("RATELIMIT_STORAGE_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("RATELIMIT_STRATEGY", "moving-window")
    monkeypatch.setenv("RATELIMIT_ENABLED", "false")
    limits = HttpLimits(Settings(_env_file=None))  # type: ignore[call-arg]
    assert isinstance(limits.slowapi.limiter.storage, MemoryStorage)
    assert limits.enabled  # FLYWHEEL_HTTP_LIMITS decides, not slowapi's own variable
    off = HttpLimits(Settings(_env_file=None, flywheel_http_limits=False))  # type: ignore[call-arg]
    assert not off.enabled


async def test_checks_do_no_io_and_never_stall_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    global _watching, _loop_thread
    _loop_thread = threading.get_ident()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, flywheel_http_limit_ip="50/minute", flywheel_http_limit_chat="20/minute"
    )
    limits = HttpLimits(settings)
    # Nor start threads: limits' own in-memory storage starts an expiry thread after hits,
    # which competes with the event loop for the GIL.
    threads_started: list[str] = []
    start = threading.Thread.start

    def spy(thread: threading.Thread) -> None:
        threads_started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", spy)
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01
    started = time.perf_counter()
    _seen.clear()
    _watching = True
    try:
        refusals = [limits.check_client(_scope("/v1/models")) for _ in range(60)]
        meters = []
        for _ in range(25):
            try:
                meters.append(limits.check_key("chat.completions", "key-1"))
            except Exception as e:  # the 429s past the limit
                meters.append(e)  # type: ignore[arg-type]
            await asyncio.sleep(0)
    finally:
        _watching = False
        loop.set_debug(False)
    elapsed = time.perf_counter() - started
    assert _seen == [], f"I/O during limit checks: {sorted(set(_seen))}"
    assert threads_started == []
    assert elapsed < 0.5  # 85 checks: a fraction of a millisecond each, no waiting
    assert [r is None for r in refusals] == [True] * 50 + [False] * 10
    refused = refusals[-1]
    assert refused is not None
    assert refused.status == 429
    assert refused.headers["retry-after"].isdigit()
    assert meters[0].remaining == 19
    assert meters[0].limit == 20
    assert all(getattr(m, "status", None) == 429 for m in meters[20:])
    assert limits.refused == 15


def test_health_has_its_own_limit_per_address() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, flywheel_http_limit_ip="2/minute", flywheel_http_limit_health="5/minute"
    )
    limits = HttpLimits(settings)
    assert [limits.check_client(_scope("/health")) is None for _ in range(6)] == [True] * 5 + [
        False
    ]
    assert limits.check_client(_scope("/health", ip="10.0.0.2")) is None  # another address
    assert limits.check_client(_scope("/v1/models")) is None  # the other limit's count


def test_bad_limit_strings_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="not a rate limit"):
        Settings(_env_file=None, flywheel_http_limit_chat="lots")  # type: ignore[call-arg]


def test_expired_windows_are_swept() -> None:
    limits = HttpLimits(Settings(_env_file=None))  # type: ignore[call-arg]
    storage = limits.slowapi.limiter.storage
    assert isinstance(storage, LoopMemoryStorage)
    for i in range(100):
        storage.incr(f"short/{i}", expiry=0.01)
    storage.incr("long", expiry=60)
    time.sleep(0.02)
    assert storage.sweep() == 100
    assert storage.get("long") == 1
    assert len(storage.expirations) == 1
