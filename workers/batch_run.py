"""One batch, run by one worker: validate, execute its lines, finalize its files.

Each line runs as live traffic does, below it (`workers.batch_line`); lines in flight
are bounded per batch (FLYWHEEL_BATCH_CONCURRENCY) and, across every worker, by
`GlobalSlots`. A line is done once its result is in the batch's journal
(`workers.batch_journal`), so a crash at any moment resumes with exactly the lines not
yet written. Every FLYWHEEL_BATCH_POLL_S the run checkpoints (progress, the lease) and
sees a cancel, the end of the completion window, a lost lease or the worker stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.config import Settings
from app.files.batch_lines import BadLine, BatchLine
from app.files.storage import FileStorage
from app.observability.batch_metrics import BatchStats
from app.routing.live_queue import LiveQueueGate
from app.state import AppState
from app.store.batch_runs import checkpoint, load, move, release
from app.store.batch_slots import GlobalSlots
from app.store.db import DB_ERRORS
from app.store.metrics_history import as_utc
from app.store.schema import Batch
from workers.batch_checks import check_input, read_lines
from workers.batch_files import write_results
from workers.batch_journal import Done, Journal, JournalWriter, Tally
from workers.batch_line import REVOKED, LineRunner, owner_of, pause

log = logging.getLogger("flywheel.batches")
READ_CHUNK = 256  # input lines read per trip to a thread
OWNER_RECHECK_S = 30.0  # how often a running batch re-reads its owner key
SHUTDOWN_WAIT_S = 20.0  # lines in flight get this long to finish when the worker stops


@dataclass(slots=True)
class BatchServices:
    """What every batch a worker runs shares (built once per worker)."""

    settings: Settings
    state: AppState  # the worker's runtime: router, cache, limits, recorder
    storage: FileStorage
    slots: GlobalSlots
    gate: LiveQueueGate
    stats: BatchStats
    worker_id: str
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


def now_utc() -> datetime:
    return datetime.now(UTC)


class BatchRun:
    def __init__(self, services: BatchServices, batch: Batch) -> None:
        self.s = services
        self.batch = batch
        self.settings = services.settings
        self.engine = services.state.engine
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.reason: str | None = None  # why `stop` was set
        self.lines = LineRunner(
            services.state,
            batch.id,
            batch.endpoint,
            services.gate,
            self.stop,
            self.settings.flywheel_batch_line_attempts,
            on_retry=services.stats.line_retried,
        )
        self.expires_at = as_utc(batch.expires_at)
        # Every finished line (the journal as loaded, plus what this run added): what
        # finalizing writes, without reading the journal again after executing.
        self.done: dict[int, Done] | None = None

    # The whole run

    async def run(self) -> str | None:
        """Take the batch as far as it goes; its status at the end (None: let go)."""
        b = self.batch
        attributes = {"flywheel.batch_id": b.id, "flywheel.batch.endpoint": b.endpoint}
        with self.s.state.tracing.span("batch.run", attributes):
            status: str | None = b.status
            self.lines.caller = await owner_of(self.s.state, b.owner)
            if status == "validating":
                async with self._held():
                    status = await self.validate()
            if status == "in_progress":
                status = await self.execute()
            # A cancel can land while an expiry is finalized: then finalize that.
            for _ in range(3):
                if status not in ("finalizing", "cancelling", "expiring"):
                    break
                async with self._held():
                    status = await self.finalize(status)
            return status

    @contextlib.asynccontextmanager
    async def _held(self) -> AsyncIterator[None]:
        """Keep the lease through a long step (validating or finalizing a big file)."""

        async def renew() -> None:
            lease_s = self.settings.flywheel_batch_lease_s
            while True:
                await asyncio.sleep(lease_s / 3)
                with contextlib.suppress(OSError, *DB_ERRORS):
                    await checkpoint(
                        self.engine, self.batch.id, self.s.worker_id, lease_s, now_utc()
                    )

        task = asyncio.create_task(renew(), name=f"batch-lease-{self.batch.id}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def validate(self) -> str | None:
        b, now = self.batch, now_utc()
        path = self.s.storage.path(b.input_file_id)
        if self.lines.caller is None:
            return await self._fail("invalid_api_key", REVOKED)
        if not await asyncio.to_thread(path.is_file):
            return await self._fail("file_not_found", f"Input file {b.input_file_id} is gone.")
        checked = await asyncio.to_thread(
            check_input,
            path,
            b.endpoint,
            self._route_problem,
            self.settings.flywheel_batch_max_requests,
        )
        if checked.errors:
            log.info("batch %s failed validation: %d errors", b.id, len(checked.errors))
            return await self._fail(errors=checked.errors)
        moved = await move(
            self.engine,
            b.id,
            self.s.worker_id,
            "in_progress",
            now,
            from_=("validating",),
            total=checked.total,
            model=checked.model,
        )
        if not moved:
            return await self._current()
        b.total = checked.total
        return "in_progress"

    def _route_problem(self, model: str) -> tuple[str, str] | None:
        if model not in self.s.state.router.routes:
            return (
                "model_not_found",
                f"The model `{model}` does not exist or you do not have access to it.",
            )
        key = None if self.lines.caller is None else self.lines.caller.key
        if key is not None and not key.allows(model):
            return ("route_not_allowed", f"this API key may not use the route {model!r}")
        return None

    async def _fail(
        self, code: str | None = None, message: str = "", errors: list[dict[str, Any]] | None = None
    ) -> str | None:
        if errors is None:
            errors = [{"code": code, "message": message, "param": None, "line": None}]
        moved = await move(
            self.engine,
            self.batch.id,
            self.s.worker_id,
            "failed",
            now_utc(),
            from_=("validating",),
            errors=errors,
        )
        if moved:
            self.s.stats.batch_finished("failed")
            return "failed"
        return await self._current()

    async def _current(self) -> str | None:
        """Someone else moved the batch (a cancel): go on from where it is now."""
        row = await load(self.engine, self.batch.id)
        if row is None or row.lease_owner != self.s.worker_id:
            return None
        self.batch = row
        return row.status

    # Executing

    async def execute(self) -> str | None:
        b = self.batch
        journal = Journal(self.settings.files_dir, b.id, self.s.worker_id)
        self.done = done = await asyncio.to_thread(journal.load)
        resumed = len(done)
        for item in done.values():
            self.tally.add(item)
        writer = JournalWriter(journal)
        await writer.start()
        watch = asyncio.create_task(self._watch(writer), name=f"batch-watch-{b.id}")
        in_flight: set[asyncio.Task[None]] = set()
        per_batch = asyncio.Semaphore(self.settings.flywheel_batch_concurrency)
        try:
            if now_utc() >= self.expires_at:
                self._halt("expired")
            async for line in self._pending(done):
                if not await self._take(per_batch):
                    break
                token = await self.s.slots.acquire(self.stop)
                if token is None:
                    per_batch.release()
                    break
                task = asyncio.create_task(self._line(line, writer, token, per_batch))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await self._drain(in_flight)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await writer.close()
        return await self._after_execution(resumed)

    async def _after_execution(self, resumed: int) -> str | None:
        b, worker = self.batch, self.s.worker_id
        progress = self.tally.progress()
        finished = self.tally.completed + self.tally.failed
        log.info(
            "batch %s: %d/%d lines done (%d from before), stopped: %s",
            b.id,
            finished,
            b.total,
            resumed,
            self.reason or "no",
        )
        if self.reason in ("lost", "shutdown"):
            if self.reason == "shutdown":
                await checkpoint(self.engine, b.id, worker, 0, now_utc(), **progress)
                await release(self.engine, b.id, worker)
            return None
        if self.reason == "cancelling":
            await checkpoint(
                self.engine,
                b.id,
                worker,
                self.settings.flywheel_batch_lease_s,
                now_utc(),
                **progress,
            )
            return "cancelling"
        if self.reason == "expired":
            return "expiring"
        if finished < b.total:
            # Lines whose result could not be written: another pass runs them.
            await checkpoint(self.engine, b.id, worker, 0, now_utc(), **progress)
            await release(self.engine, b.id, worker)
            return None
        moved = await move(
            self.engine, b.id, worker, "finalizing", now_utc(), from_=("in_progress",), **progress
        )
        return "finalizing" if moved else await self._current()

    async def _pending(self, done: dict[int, Done]) -> AsyncIterator[BatchLine | BadLine]:
        lines = read_lines(self.s.storage.path(self.batch.input_file_id))
        try:
            while not self.stop.is_set():
                chunk = await asyncio.to_thread(_take_some, lines, READ_CHUNK)
                if not chunk:
                    return
                for line in chunk:
                    number = line.line if isinstance(line, BadLine) else line.number
                    if number not in done:
                        yield line
        finally:
            await asyncio.to_thread(lines.close)

    async def _take(self, per_batch: asyncio.Semaphore) -> bool:
        """A place among the batch's lines in flight; False once the batch stops."""
        if self.stop.is_set():
            return False
        acquire = asyncio.ensure_future(per_batch.acquire())
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if acquire.done() and not self.stop.is_set():
            return True
        if acquire.done():
            per_batch.release()
        else:
            acquire.cancel()
        return False

    async def _drain(self, in_flight: set[asyncio.Task[None]]) -> None:
        """Let the lines in flight finish: all of them normally; on a lost lease none
        (the batch's new holder runs them); at shutdown for a bounded time."""
        if not in_flight:
            return
        if self.reason == "lost":
            for task in in_flight:
                task.cancel()
        wait = SHUTDOWN_WAIT_S if self.reason == "shutdown" else None
        _, late = await asyncio.wait(set(in_flight), timeout=wait)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _line(
        self,
        line: BatchLine | BadLine,
        writer: JournalWriter,
        token: str,
        per_batch: asyncio.Semaphore,
    ) -> None:
        stats = self.s.stats
        stats.lines_in_flight += 1
        try:
            done = await self.lines.run(line, self._results_stand)
            if done is not None:
                await writer.add(done)
                self.tally.add(done)
                if self.done is not None:
                    self.done.setdefault(done.number, done)
                stats.line_finished(self.batch.endpoint, ok=done.ok)
        except asyncio.CancelledError:
            raise
        except Exception:  # one line's bug (or an unwritable journal) must not end the batch
            log.exception("batch %s: a line failed unexpectedly", self.batch.id)
        finally:
            stats.lines_in_flight -= 1
            per_batch.release()
            with contextlib.suppress(Exception):
                await self.s.slots.release(token)

    def _results_stand(self) -> bool:
        """Whether a line stopped by the batch keeps the answer it had: yes when the
        batch was cancelled or expired; no when this worker stops or lost the batch
        (then the line is left for whoever runs the batch next)."""
        return self.reason not in ("shutdown", "lost")

    # Watching: checkpoints, cancels, expiry, the lease, shutdown

    def _halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    async def _watch(self, writer: JournalWriter) -> None:
        b, worker, lease_s = self.batch, self.s.worker_id, self.settings.flywheel_batch_lease_s
        last_ok = last_owner_check = time.monotonic()
        while not self.stop.is_set():
            await pause(self.s.stopping, self.settings.flywheel_batch_poll_s)
            if self.s.stopping.is_set():
                self._halt("shutdown")
                return
            try:
                await writer.sync()
                status = await checkpoint(
                    self.engine, b.id, worker, lease_s, now_utc(), **self.tally.progress()
                )
            except (OSError, *DB_ERRORS) as e:
                log.warning("batch %s: checkpoint failed (%s)", b.id, type(e).__name__)
                if time.monotonic() - last_ok > lease_s * 0.8:
                    self._halt("lost")  # the lease is about to lapse: let another take it
                continue
            last_ok = time.monotonic()
            if status is None:
                log.warning("batch %s: another worker holds it now; stopping here", b.id)
                self._halt("lost")
            elif status == "cancelling":
                self._halt("cancelling")
            elif now_utc() >= self.expires_at:
                self._halt("expired")
            if time.monotonic() - last_owner_check > OWNER_RECHECK_S:
                last_owner_check = time.monotonic()
                with contextlib.suppress(*DB_ERRORS):
                    self.lines.caller = await owner_of(self.s.state, b.owner)

    # Finalizing

    async def finalize(self, status: str) -> str | None:
        """Write the output and error files, then the final status. Safe to repeat: the
        files' ids follow from the batch's, so a worker that dies here leaves nothing
        a successor would duplicate."""
        b = self.batch
        final, code, message = {
            "finalizing": ("completed", "", ""),
            "cancelling": (
                "cancelled",
                "batch_cancelled",
                "This request was not executed: the batch was cancelled.",
            ),
            "expiring": (
                "expired",
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
        }[status]
        journal = Journal(self.settings.files_dir, b.id, self.s.worker_id)
        done = self.done if self.done is not None else await asyncio.to_thread(journal.load)
        tally = Tally()
        for item in done.values():
            tally.add(item)
        written = await write_results(
            self.s.storage,
            self.engine,
            b,
            done,
            self.settings,
            unrun=(code, message) if code else None,
        )
        from_ = ("in_progress",) if status == "expiring" else (status,)
        moved = await move(
            self.engine,
            b.id,
            self.s.worker_id,
            final,
            now_utc(),
            from_=from_,
            output_file_id=written.output_file_id,
            error_file_id=written.error_file_id,
            **tally.progress(),
        )
        if not moved:
            return await self._current()
        await asyncio.to_thread(journal.remove)
        self.s.stats.batch_finished(final)
        log.info("batch %s %s: %d completed, %d failed", b.id, final, tally.completed, tally.failed)
        return final


def _take_some(lines: Iterator[BatchLine | BadLine], n: int) -> list[BatchLine | BadLine]:
    out: list[BatchLine | BadLine] = []
    for line in lines:
        out.append(line)
        if len(out) >= n:
            break
    return out
