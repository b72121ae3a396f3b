"""Stopping background tasks when a cancel is lost on the way (CI once hung a test
gateway's shutdown for good: its variant-plan loop went on after its cancel came back
as a Redis client's TimeoutError, which the loop rides out)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from app import background
from app.background import stop_tasks


async def _deaf_loop(turns: list[int]) -> None:
    """A loop that rides out timeouts, over a library that turns a cancel into one."""
    while True:
        try:
            try:
                await asyncio.sleep(0.3)  # a read under a client's timeout
            except asyncio.CancelledError:
                raise TimeoutError("timeout reading from the server") from None
        except TimeoutError:
            turns.append(1)  # "not refreshed; keeping the last"
        await asyncio.sleep(10)  # until the next refresh


async def test_a_lost_cancel_is_repeated_until_the_task_ends() -> None:
    turns: list[int] = []
    task = asyncio.create_task(_deaf_loop(turns))
    await asyncio.sleep(0.05)  # in the read
    # What the shutdown used to do, once: the cancel is lost and the loop goes on.
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    assert turns == [1]
    started = time.monotonic()
    await stop_tasks(task)
    assert task.cancelled()
    assert time.monotonic() - started < 0.5  # the next cancel lands in its sleep


async def test_a_task_that_will_not_stop_is_left_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(background, "ROUND_S", 0.05)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, "flywheel.background"):
        await stop_tasks(task)
    assert not task.done()
    assert "stubborn" in caplog.text
    release.set()  # let it end, so it does not outlive the test
    task.cancel()
    await task


async def test_a_crashed_task_does_not_cut_a_shutdown_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def crash() -> None:
        raise ValueError("boom")

    crashed = asyncio.create_task(crash(), name="crashed")
    sleeper = asyncio.create_task(asyncio.sleep(10), name="sleeper")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, "flywheel.background"):
        await stop_tasks(crashed, None, sleeper)
    assert sleeper.cancelled()
    assert "crashed" in caplog.text
    assert "boom" in caplog.text
