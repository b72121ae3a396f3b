"""A finished batch's output and error files, as OpenAI delivers them.

The output file holds one line per request answered 2xx, the error file one per
request that failed (and, for an expired or cancelled batch, one per request never
run), each with its `custom_id`, in input order. Their ids follow from the batch's, so
finalizing again after a crash rewrites the same files and finds their rows already
there: never two outputs for one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.files.batch_lines import BadLine
from app.files.storage import FileStorage
from app.store.files import add_file, get_file
from app.store.schema import Batch
from workers.batch_checks import read_lines
from workers.batch_journal import Done


@dataclass(frozen=True, slots=True)
class Written:
    output_file_id: str | None
    error_file_id: str | None


@dataclass(frozen=True, slots=True)
class _Part:
    file_id: str
    size: int
    lines: int


def result_line(custom_id: str | None, rid: str, status: int, body: Any) -> dict[str, Any]:
    """A line of the output (2xx) or error file, as OpenAI writes it."""
    return {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": rid, "body": body},
        "error": None,
    }


def unrun_line(custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """A line the batch never ran (it expired, was cancelled, or the line was unusable)."""
    return {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def derived_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def _write_parts(
    storage: FileStorage,
    batch: Batch,
    done: dict[int, Done],
    unrun: tuple[str, str] | None,
) -> tuple[_Part | None, _Part | None]:
    """Both files, in one pass over the input (blocking)."""
    ids = {True: derived_id(batch.id, "output"), False: derived_id(batch.id, "errors")}
    lines = {True: 0, False: 0}
    with storage.temp() as out, storage.temp() as err:
        files = {True: out, False: err}
        for line in read_lines(storage.path(batch.input_file_id)):
            number = line.line if isinstance(line, BadLine) else line.number
            item = done.get(number)
            if item is not None:
                record, ok = item.result, item.ok
            elif unrun is not None:
                custom_id = None if isinstance(line, BadLine) else line.custom_id
                record, ok = unrun_line(custom_id, *unrun), False
            else:
                continue
            files[ok].write(orjson.dumps(record) + b"\n")
            lines[ok] += 1
        parts: list[_Part | None] = []
        for ok in (True, False):
            if lines[ok]:
                storage.commit(files[ok], ids[ok])
                parts.append(_Part(ids[ok], files[ok].size, lines[ok]))
            else:
                parts.append(None)
    return parts[0], parts[1]


async def write_results(
    storage: FileStorage,
    engine: AsyncEngine,
    batch: Batch,
    done: dict[int, Done],
    settings: Settings,
    *,
    unrun: tuple[str, str] | None = None,
) -> Written:
    out, err = await asyncio.to_thread(_write_parts, storage, batch, done, unrun)
    now = datetime.now(UTC)
    seconds = batch.output_expires_s
    keep = (
        timedelta(seconds=seconds)
        if seconds
        else timedelta(days=settings.flywheel_batch_file_expiry_days)
    )
    for part, kind in ((out, "output"), (err, "errors")):
        if part is None or await get_file(engine, part.file_id) is not None:
            continue
        with contextlib.suppress(IntegrityError):  # another finalizer was first: same file
            await add_file(
                engine,
                file_id=part.file_id,
                owner=batch.owner,
                purpose="batch_output",
                filename=f"{batch.id}_{kind}.jsonl",
                size=part.size,
                lines=part.lines,
                expires_at=now + keep,
            )
    return Written(None if out is None else out.file_id, None if err is None else err.file_id)
