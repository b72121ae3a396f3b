"""A batch's progress on disk: one JSON line per finished request.

Each worker that runs the batch appends to a part file of its own (never two writers in
one file), in `<files dir>/batch-work/<batch id>/`. A line counts as done only once it
is written, so a worker killed at any moment leaves the set of finished lines exactly
as the part files say; the next worker reads them, skips those lines and goes on. A
line torn by the kill (the last one of a part, without its newline) is ignored: its
request runs again. The writes are grouped (everything finished while the previous
write was in a thread goes in the next one, one `write` call) and reach the disk's
cache at once; they are fsynced at each checkpoint, which bounds what a machine crash
(not a process crash) can take back.

Finalizing reads every part (a line written twice, by a worker that lost its lease
while a successor re-ran it, is kept once) and writes the output and error files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("flywheel.batches")


@dataclass(frozen=True, slots=True)
class Done:
    number: int  # the line's number in the input file (1-based)
    ok: bool  # a 2xx answer: the output file; else the error file
    result: dict[str, Any]  # the line as OpenAI writes it in the output or error file

    def encode(self) -> bytes:
        return orjson.dumps({"n": self.number, "ok": self.ok, "r": self.result}) + b"\n"

    @classmethod
    def decode(cls, raw: bytes) -> Done:
        data = orjson.loads(raw)
        return cls(int(data["n"]), bool(data["ok"]), data["r"])


@dataclass(slots=True)
class Tally:
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=dict)

    def add(self, done: Done) -> None:
        if done.ok:
            self.completed += 1
        else:
            self.failed += 1
        response = done.result.get("response") or {}
        usage = (response.get("body") or {}).get("usage") if done.ok else None
        if not isinstance(usage, dict):
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        for name, value in (
            ("input_tokens", prompt),
            ("output_tokens", completion),
            ("cached_tokens", int(details.get("cached_tokens") or 0)),
            ("reasoning_tokens", int(reasoning or 0)),
        ):
            self.usage[name] = self.usage.get(name, 0) + value

    def progress(self) -> dict[str, Any]:
        u = self.usage
        inp, out = u.get("input_tokens", 0), u.get("output_tokens", 0)
        return {
            "completed": self.completed,
            "failed": self.failed,
            "usage": {
                "input_tokens": inp,
                "input_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)},
                "total_tokens": inp + out,
            },
        }


class Journal:
    def __init__(self, files_dir: Path, batch_id: str, writer: str) -> None:
        self.dir = files_dir / "batch-work" / batch_id
        self._part = self.dir / f"part-{_safe(writer)}.jsonl"
        self._fd: int | None = None

    # Blocking: run these in a thread.

    def load(self) -> dict[int, Done]:
        """Every line finished so far, by any worker (the first record of each wins)."""
        done: dict[int, Done] = {}
        if not self.dir.is_dir():
            return done
        for part in sorted(self.dir.glob("part-*.jsonl")):
            with part.open("rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        log.info("batch journal %s: a torn last line ignored", part.name)
                        break
                    try:
                        item = Done.decode(raw)
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        log.warning("batch journal %s: an unreadable line skipped", part.name)
                        continue
                    done.setdefault(item.number, item)
        return done

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # A part left by an earlier run of this very writer id may end torn: start on a
        # fresh line so the torn bytes stay one ignorable line, not glued to ours.
        if os.fstat(self._fd).st_size:
            os.write(self._fd, b"\n")

    def write(self, items: Iterable[Done]) -> None:
        assert self._fd is not None, "open() first"
        data = b"".join(item.encode() for item in items)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class JournalWriter:
    """Appends finished lines from the event loop: `await add(done)` returns once the
    line is written, so the caller counts it done only then."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._pending: list[tuple[Done, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await asyncio.to_thread(self.journal.open)
        self._task = asyncio.create_task(self._run(), name="batch-journal")

    async def add(self, done: Done) -> None:
        if self._closing:
            raise RuntimeError("batch journal closed")
        written = asyncio.get_running_loop().create_future()
        self._pending.append((done, written))
        self._wake.set()
        await written

    async def sync(self) -> None:
        await asyncio.to_thread(self.journal.sync)

    async def close(self) -> None:
        """Write what is pending, then close the part."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        for _, written in self._pending:
            if not written.done():
                written.set_exception(RuntimeError("batch journal closed"))
        self._pending.clear()
        await asyncio.to_thread(self.journal.close)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            group, self._pending = self._pending, []
            if group:
                await self._write(group)
            if self._closing and not self._pending:
                return

    async def _write(self, group: list[tuple[Done, asyncio.Future[None]]]) -> None:
        try:
            await asyncio.to_thread(self.journal.write, [d for d, _ in group])
        except OSError as e:
            for _, written in group:
                if not written.done():
                    written.set_exception(e)
            return
        for _, written in group:
            if not written.done():
                written.set_result(None)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
