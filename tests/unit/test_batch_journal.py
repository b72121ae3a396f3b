"""A batch's journal and the executor's pure parts: what a part file says is done (a
torn last line ignored, several parts read, the first record of a line kept), the
writer grouping concurrent lines into few writes and flushing what is pending when it
closes; which errors a line tries again and how long it waits (`retry_wait`); the
usage a batch reports (`Tally`)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.errors import (
    GatewayError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.ratelimit.headers import retry_headers
from workers import batch_line
from workers.batch_journal import Done, Journal, JournalWriter, Tally
from workers.batch_line import RATE_LIMIT_WAITS, retry_wait

BATCH = "batch_0123456789abcdef01234567"


def ok(n: int, marker: str = "", usage: dict[str, Any] | None = None) -> Done:
    body: dict[str, Any] = {"marker": marker}
    if usage is not None:
        body["usage"] = usage
    result = {
        "id": f"batch_req_{n}",
        "custom_id": f"c{n}",
        "response": {"status_code": 200, "request_id": f"r{n}", "body": body},
        "error": None,
    }
    return Done(n, True, result)


def failed(n: int, status: int = 400, body: dict[str, Any] | None = None) -> Done:
    result = {
        "id": f"batch_req_{n}",
        "custom_id": f"c{n}",
        "response": {"status_code": status, "request_id": f"r{n}", "body": body or {}},
        "error": None,
    }
    return Done(n, False, result)


def write_part(journal: Journal, items: Iterable[Done], tail: bytes = b"") -> None:
    journal.open()
    journal.write(items)
    journal.close()
    if tail:
        with journal._part.open("ab") as f:
            f.write(tail)


# The journal on disk


def test_done_round_trips() -> None:
    item = ok(7, "x", {"prompt_tokens": 3})
    raw = item.encode()
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1
    assert Done.decode(raw) == item


def test_nothing_written_is_nothing_done(tmp_path: Path) -> None:
    assert Journal(tmp_path, BATCH, "w1").load() == {}


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    journal = Journal(tmp_path, BATCH, "w1")
    torn = ok(3).encode()[:-9]  # killed in the middle of its write: no newline
    write_part(journal, [ok(1), failed(2)], tail=torn)
    done = journal.load()
    assert sorted(done) == [1, 2]
    assert done[1].ok
    assert not done[2].ok
    assert done[2].result["response"]["status_code"] == 400


def test_a_worker_reopening_its_torn_part_keeps_its_new_lines(tmp_path: Path) -> None:
    # The same worker id starts again (a restarted process with a fixed id): its part
    # ends torn; what it writes next must not be glued to the torn bytes.
    journal = Journal(tmp_path, BATCH, "w1")
    write_part(journal, [ok(1)], tail=ok(2).encode()[:10])
    again = Journal(tmp_path, BATCH, "w1")
    write_part(again, [ok(3), ok(4)])
    assert sorted(again.load()) == [1, 3, 4]


def test_an_unreadable_line_in_the_middle_is_skipped_not_the_rest(tmp_path: Path) -> None:
    journal = Journal(tmp_path, BATCH, "w1")
    journal.open()
    journal.write([ok(1)])
    assert journal._fd is not None
    os.write(journal._fd, b'{"n": "not a number"}\n{"nope": 1}\n[1, 2]\n')
    journal.write([ok(2)])
    journal.close()
    assert sorted(journal.load()) == [1, 2]


def test_every_part_is_read_and_the_first_record_of_a_line_wins(tmp_path: Path) -> None:
    first = Journal(tmp_path, BATCH, "worker-a")
    second = Journal(tmp_path, BATCH, "worker-b")
    # worker-a ran lines 1-2; it lost its lease and worker-b ran 2 again, then 3; within
    # worker-b's part, line 3 also appears twice.
    write_part(first, [ok(1, "a"), ok(2, "a")], tail=ok(9, "a").encode()[:-1])
    write_part(second, [ok(2, "b"), ok(3, "b"), failed(3), ok(4, "b")])
    done = Journal(tmp_path, BATCH, "reader").load()
    assert sorted(done) == [1, 2, 3, 4]  # 9 was torn
    assert done[2].result["response"]["body"]["marker"] == "a"
    assert done[3].ok
    assert done[3].result["response"]["body"]["marker"] == "b"
    # Both parts are there: one writer never appends to another's part.
    parts = sorted(p.name for p in first.dir.iterdir())
    assert parts == ["part-worker-a.jsonl", "part-worker-b.jsonl"]


def test_a_writer_id_never_names_a_path_outside_the_batch(tmp_path: Path) -> None:
    journal = Journal(tmp_path, BATCH, "../../host:1/evil")
    write_part(journal, [ok(1)])
    assert [p.parent for p in journal.dir.iterdir()] == [journal.dir]
    assert journal.load()[1].ok


def test_remove_clears_every_part(tmp_path: Path) -> None:
    for writer in ("a", "b"):
        write_part(Journal(tmp_path, BATCH, writer), [ok(1)])
    journal = Journal(tmp_path, BATCH, "a")
    journal.remove()
    assert not journal.dir.exists()
    assert journal.load() == {}


# The writer


class SlowJournal(Journal):
    """Each write takes a while (a slow disk) and is recorded as one group."""

    def __init__(self, files_dir: Path, delay_s: float = 0.03) -> None:
        super().__init__(files_dir, BATCH, "slow")
        self.groups: list[list[int]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def write(self, items: Iterable[Done]) -> None:
        items = list(items)
        time.sleep(self.delay_s)
        with self.lock:
            self.groups.append([d.number for d in items])
        super().write(items)


async def test_the_writer_groups_concurrent_lines_and_returns_once_written(
    tmp_path: Path,
) -> None:
    journal = SlowJournal(tmp_path)
    writer = JournalWriter(journal)
    await writer.start()
    written: list[int] = []

    async def line(n: int) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))
        await writer.add(ok(n))
        # Returned: the line is on disk (in the part), whatever else is still pending.
        assert any(n in group for group in journal.groups)
        written.append(n)

    await asyncio.gather(*(line(n) for n in range(1, 201)))
    await writer.close()
    assert sorted(written) == list(range(1, 201))
    assert sorted(n for g in journal.groups for n in g) == list(range(1, 201))
    assert len(journal.groups) <= 10, journal.groups  # grouped, not one write per line
    assert sorted(Journal(tmp_path, BATCH, "reader").load()) == list(range(1, 201))


async def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    journal = SlowJournal(tmp_path, delay_s=0.05)
    writer = JournalWriter(journal)
    await writer.start()
    first = asyncio.create_task(writer.add(ok(1)))
    await asyncio.sleep(0.01)  # line 1 is being written; the rest queue behind it
    rest = [asyncio.create_task(writer.add(ok(n))) for n in range(2, 30)]
    await asyncio.sleep(0)
    await writer.close()
    await asyncio.wait_for(asyncio.gather(first, *rest), 5)  # none failed, none hangs
    assert sorted(Journal(tmp_path, BATCH, "reader").load()) == list(range(1, 30))
    assert journal._fd is None  # closed


async def test_a_failed_write_fails_its_lines_not_the_writer(tmp_path: Path) -> None:
    class Flaky(Journal):
        broken = True

        def write(self, items: Iterable[Done]) -> None:
            if self.broken:
                raise OSError(28, "No space left on device")
            super().write(items)

    journal = Flaky(tmp_path, BATCH, "w1")
    writer = JournalWriter(journal)
    await writer.start()
    with pytest.raises(OSError, match="No space left"):
        await writer.add(ok(1))
    journal.broken = False
    await writer.add(ok(2))
    await writer.close()
    assert sorted(journal.load()) == [2]


# retry_wait


def upstream(status: int, **kwargs: Any) -> UpstreamStatusError:
    return UpstreamStatusError(status, f"upstream returned {status}", **kwargs)


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("bad"),
        upstream(400),
        upstream(401),
        upstream(404),
        upstream(422),
        GatewayError("teapot", status=418),
    ],
    ids=["invalid", "400", "401", "404", "422", "418"],
)
def test_client_errors_are_final(error: GatewayError) -> None:
    assert retry_wait(error, 1, 4, 0) is None


@pytest.mark.parametrize(
    "error",
    [
        upstream(408),
        upstream(429),
        upstream(500),
        upstream(503),
        UpstreamError("cannot reach upstream"),
        UpstreamTimeoutError("slow"),
        ServiceUnavailableError("no deployment"),
        GatewayError("gateway", status=500),
    ],
    ids=["408", "429", "500", "503", "502", "504", "503-own", "500-own"],
)
def test_retryable_errors_use_up_tries(error: GatewayError) -> None:
    assert error.status in batch_line.RETRYABLE
    for tries in (1, 2, 3):
        wait = retry_wait(error, tries, 4, 0)
        assert wait is not None
        assert 0 < wait <= 45
    assert retry_wait(error, 4, 4, 0) is None
    assert retry_wait(error, 9, 4, 0) is None


def test_backoff_doubles_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "random", lambda: 0.5)  # no jitter
    error = upstream(503)
    waits = [retry_wait(error, tries, 100, 0) for tries in range(1, 10)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_limits_429s_wait_without_using_up_tries() -> None:
    error = RateLimitError("RPM", code="rate_limit_exceeded", headers=retry_headers(2.3))
    assert retry_wait(error, 4, 4, 1) == 2.3  # tries spent: it still waits, as told
    assert retry_wait(error, 0, 4, RATE_LIMIT_WAITS - 1) == 2.3
    assert retry_wait(error, 0, 4, RATE_LIMIT_WAITS) is None  # held back long enough
    hinted_nothing = RateLimitError("RPM", code="rate_limit_exceeded")
    assert retry_wait(hinted_nothing, 0, 4, 1) == 0.05  # a short poll, not a backoff


def test_retry_after_is_a_floor() -> None:
    error = ServiceUnavailableError("down", headers={"retry-after": "7"})
    wait = retry_wait(error, 1, 4, 0)
    assert wait is not None
    assert wait >= 7
    garbled = ServiceUnavailableError("down", headers={"retry-after": "soon"})
    wait = retry_wait(garbled, 1, 4, 0)
    assert wait is not None
    assert 0 < wait < 1


def test_insufficient_quota_is_final() -> None:
    spent = RateLimitError("budget spent", code="insufficient_quota", headers=retry_headers(60))
    assert retry_wait(spent, 0, 4, 0) is None
    assert retry_wait(upstream(429, code="insufficient_quota"), 0, 4, 0) is None


@pytest.mark.parametrize(
    "error",
    [
        upstream(503, retry_after=5),
        upstream(429, retry_after=5),
        ServiceUnavailableError(
            "every deployment of route 'r' is failing; retry later",
            code="deployments_unavailable",
            headers={"Retry-After": "5"},
        ),
    ],
    ids=["upstream-503", "upstream-429", "breakers-open"],
)
def test_an_upstreams_retry_after_is_honoured(error: GatewayError) -> None:
    wait = retry_wait(error, 1, 4, 0)
    assert wait is not None
    assert wait >= 5


def test_an_upstreams_429_uses_up_tries_like_other_upstream_errors() -> None:
    error = upstream(429, code="rate_limit_exceeded")
    assert retry_wait(error, 4, 4, 0) is None


# Tally


def test_tally_sums_usage_of_answered_lines_only() -> None:
    tally = Tally()
    tally.add(
        ok(
            1,
            usage={
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
        )
    )
    tally.add(ok(2, usage={"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}))
    tally.add(ok(3, usage={"prompt_tokens": 3, "total_tokens": 3}))  # an embedding
    tally.add(ok(4))  # no usage at all
    tally.add(ok(5, usage={"prompt_tokens": None, "completion_tokens_details": None}))
    # A failed line's body is an error; even one carrying usage is not counted.
    tally.add(failed(6, 500, {"usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}))
    tally.add(Done(7, False, {"custom_id": "c7", "response": None, "error": {"code": "x"}}))
    assert (tally.completed, tally.failed) == (5, 2)
    assert tally.progress() == {
        "completed": 5,
        "failed": 2,
        "usage": {
            "input_tokens": 20,
            "input_tokens_details": {"cached_tokens": 4},
            "output_tokens": 6,
            "output_tokens_details": {"reasoning_tokens": 2},
            "total_tokens": 26,
        },
    }


def test_an_empty_tally_reports_zeros() -> None:
    progress = Tally().progress()
    assert progress["completed"] == progress["failed"] == 0
    assert progress["usage"]["total_tokens"] == 0
    assert orjson.loads(orjson.dumps(progress)) == progress  # stored as JSON in the row
