"""Metrics history's pure parts: bucket alignment, the buckets a run redoes, cron sets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.store.metrics_history import align, plan_buckets, rank, window_start
from workers.tasks.metrics import schedule

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
I = 300  # noqa: E741 - the interval, in seconds


def at(buckets: int, seconds: float = 0) -> datetime:
    return T0 + timedelta(seconds=buckets * I + seconds)


def test_align_is_to_the_epoch_and_utc() -> None:
    assert align(at(0, 299.9), I) == T0
    assert align(at(1), I) == at(1)
    naive = datetime(2030, 1, 1, 12, 4, 59)  # SQLite returns naive UTC
    assert align(naive, I) == T0
    assert align(T0, 7) == datetime.fromtimestamp(int(T0.timestamp()) // 7 * 7, UTC)


def test_plan_redoes_the_open_bucket_and_the_recently_closed() -> None:
    # Mid-bucket: the open one and the previous (its rows may still be arriving).
    assert plan_buckets(at(10, 150), I, 288, at(10), None) == [at(9), at(10)]
    # Right at a boundary: the bucket that closed a moment ago is redone next time too.
    assert plan_buckets(at(10, 1), I, 288, at(9), None) == [at(8), at(9), at(10)]


def test_plan_catches_up_after_downtime_within_the_history() -> None:
    assert plan_buckets(at(10, 150), I, 288, at(4), None) == [at(k) for k in range(4, 11)]
    # Down for longer than the history: only what is kept is recomputed.
    assert plan_buckets(at(1000, 150), I, 5, at(4), None) == [at(k) for k in range(996, 1001)]
    # First run: from the first request, bounded the same way.
    assert plan_buckets(at(10, 150), I, 288, None, at(7, 12)) == [at(k) for k in range(7, 11)]
    assert plan_buckets(at(10, 150), I, 3, None, at(0)) == [at(8), at(9), at(10)]
    assert plan_buckets(at(10, 150), I, 288, None, None) == [at(9), at(10)]
    assert window_start(at(10, 150), I, 3) == at(8)


def test_nearest_rank() -> None:
    assert [rank(100, p) for p in (50, 95, 99)] == [50, 95, 99]
    assert [rank(1, p) for p in (50, 95, 99)] == [1, 1, 1]
    assert [rank(10, p) for p in (50, 95, 99)] == [5, 10, 10]


def test_cron_sets_run_at_least_once_per_interval() -> None:
    assert schedule(300) == {"minute": set(range(0, 60, 5)), "second": {0}}
    assert schedule(3600) == {"minute": {0}, "second": {0}}
    assert schedule(30) == {"second": {0, 30}}
    assert schedule(10) == {"second": set(range(0, 60, 10))}
    # Not dividing the minute or the hour: more often than the interval, never less.
    assert schedule(420) == {"minute": set(range(0, 60, 6)), "second": {0}}
    assert schedule(90) == {"minute": set(range(60)), "second": {0}}
    assert schedule(45) == {"second": {0, 30}}


def test_plan_reaches_back_to_rows_that_landed_late() -> None:
    # The last point is current, but the consolidation wrote rows of bucket 6 since.
    assert plan_buckets(at(10, 150), I, 288, at(10), None, at(6, 40)) == [
        at(k) for k in range(6, 11)
    ]
    assert plan_buckets(at(10, 150), I, 3, at(10), None, at(0)) == [at(8), at(9), at(10)]
