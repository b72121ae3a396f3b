"""OpenAI's Files API, for batch input files: upload, list, retrieve, read, delete
(`/v1/files`).

An upload is streamed to disk (`app.files.upload`) under the size limit, checked line by
line as batch requests (a bad line is a 400 naming it, and nothing is kept), put in
place under its id, and only then recorded in the database. A file belongs to the key
that uploaded it: another key gets a 404 (nothing says it exists); the master key sees
and manages every file; callers without a virtual key (the master key, and anonymous
callers where keys are optional) own files as `owner` None, as they do batches. Expired
files are not found, until the pruner removes them. Reads of the database are bounded
(`read_db`): one that does not answer is a 503, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, BinaryIO, Literal, NamedTuple
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from app.api.admin import json_response
from app.api.auth import Caller
from app.api.cycle import read_db
from app.deps import CallerDep, StateDep
from app.errors import GatewayError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from app.files.batch_lines import BadLine, scan_upload
from app.files.storage import FileStorage, is_file_id, new_file_id
from app.files.upload import FILE_FIELD, check_length, receive_upload
from app.state import AppState
from app.store.files import (
    FileInUse,
    add_file,
    delete_file,
    file_object,
    get_file,
    is_expired,
    list_files,
)
from app.store.schema import StoredFile

router = APIRouter(prefix="/v1/files", tags=["files"])
log = logging.getLogger("flywheel.files")

PURPOSES = ("batch",)  # what may be uploaded; the workers also write `batch_output`
EXPIRY_S = (3600, 30 * 24 * 3600)  # OpenAI's bounds on `expires_after[seconds]`
READ_CHUNK = 256 * 1024
_SECONDS = re.compile(r"[0-9]{1,9}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": EXPIRY_S[0],
                            "maximum": EXPIRY_S[1],
                        },
                    },
                }
            }
        },
    }
}


FileId = Annotated[str, Path(max_length=64)]


def _not_found(file_id: str, param: str = "id") -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param=param, code="file_not_found")


def _storage_down(e: OSError) -> ServiceUnavailableError:
    log.warning("files directory unusable: %s", e)
    return ServiceUnavailableError(
        f"file storage is unavailable ({type(e).__name__})", code="storage_unavailable"
    )


async def visible_file(
    state: AppState, caller: Caller, file_id: str, param: str = "id"
) -> StoredFile:
    """The caller's unexpired file, or a 404 (naming `param`) whatever the reason."""
    if not is_file_id(file_id):
        raise _not_found(file_id, param)
    row = await read_db("files", lambda: get_file(state.engine, file_id))
    if row is None or not caller.owns(row.owner) or is_expired(row, datetime.now(UTC)):
        raise _not_found(file_id, param)
    return row


def _purpose(fields: Mapping[str, str]) -> str:
    purpose = fields.get("purpose")
    if not purpose:
        raise InvalidRequestError(
            "`purpose` is required.", param="purpose", code="missing_required_parameter"
        )
    if purpose not in PURPOSES:
        raise InvalidRequestError(
            f"This gateway takes files for the Batch API only: `purpose` must be 'batch', "
            f"not {purpose[:64]!r}.",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def _expires_in(fields: Mapping[str, str], default_days: float) -> timedelta:
    """`expires_after` as the SDKs send it in a form (`expires_after[anchor]` and
    `expires_after[seconds]`), else the configured default."""
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return timedelta(days=default_days)
    if anchor != "created_at":
        raise InvalidRequestError(
            "`expires_after[anchor]` must be 'created_at'.",
            param="expires_after.anchor",
            code="invalid_value",
        )
    lo, hi = EXPIRY_S
    if seconds is None or not _SECONDS.fullmatch(seconds) or not lo <= int(seconds) <= hi:
        raise InvalidRequestError(
            f"`expires_after[seconds]` must be a whole number from {lo} to {hi}.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return timedelta(seconds=int(seconds))


class Received(NamedTuple):
    filename: str
    size: int
    purpose: str
    expires_in: timedelta
    lines: int


async def _receive(
    state: AppState, request: Request, storage: FileStorage, file_id: str
) -> Received:
    """Receive the upload, check it and put its bytes in place as `file_id`."""
    settings = state.settings
    max_bytes = settings.flywheel_files_max_bytes
    try:
        temp = await asyncio.to_thread(storage.temp)
    except OSError as e:
        raise _storage_down(e) from e
    try:
        upload = await receive_upload(request.headers, request.stream(), temp, max_bytes)
        if upload.filename is None:
            raise InvalidRequestError(
                "`file` is required.", param=FILE_FIELD, code="missing_required_parameter"
            )
        purpose = _purpose(upload.fields)
        expires_in = _expires_in(upload.fields, settings.flywheel_batch_file_expiry_days)
        max_line = settings.flywheel_max_body_bytes + 64 * 1024  # the request and its envelope
        try:
            lines = await asyncio.to_thread(
                scan_upload, temp.path, settings.flywheel_batch_max_requests, max_line
            )
        except BadLine as e:
            raise InvalidRequestError(e.message, param=FILE_FIELD, code=e.code) from None
        await asyncio.to_thread(storage.commit, temp, file_id)
    except ClientDisconnect:
        raise InvalidRequestError(
            "The upload was interrupted.", param=FILE_FIELD, code="upload_interrupted"
        ) from None
    except OSError as e:
        raise _storage_down(e) from e
    finally:
        await asyncio.to_thread(temp.discard)  # nothing, once committed
    return Received(upload.filename, upload.size, purpose, expires_in, lines)


@router.post("", openapi_extra=UPLOAD_FORM)
async def create_file(request: Request, state: StateDep, caller: CallerDep) -> Response:
    """Upload a JSONL file of batch requests (`purpose` = batch), as multipart form data."""
    settings = state.settings
    check_length(request.headers, settings.flywheel_files_max_bytes)
    storage = FileStorage.from_settings(settings)
    file_id = new_file_id()
    got = await _receive(state, request, storage, file_id)
    now = datetime.now(UTC)
    try:
        row = await read_db(
            "files",
            lambda: add_file(
                state.engine,
                file_id=file_id,
                owner=caller.owner,
                purpose=got.purpose,
                filename=got.filename,
                size=got.size,
                lines=got.lines,
                expires_at=now + got.expires_in,
                created_at=now,
            ),
        )
    except GatewayError:
        # Not recorded: the bytes would be reachable by no one.
        try:
            await asyncio.to_thread(storage.delete, file_id)
        except OSError as e:
            log.warning("file %s: unrecorded upload left on disk: %s", file_id, e)
        raise
    return json_response(file_object(row))


@router.get("")
async def list_all(
    state: StateDep,
    caller: CallerDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[
        str | None, Query(max_length=64, description="last id of the page before")
    ] = None,
) -> dict[str, Any]:
    """The caller's files (every file for the master key), newest first by default."""
    rows, has_more = await read_db(
        "files",
        lambda: list_files(
            state.engine,
            owner=caller.owner,
            everyone=caller.master,
            now=datetime.now(UTC),
            purpose=purpose,
            after=after,
            limit=limit,
            order=order,
        ),
    )
    data = [file_object(r) for r in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@router.get("/{file_id}")
async def retrieve(file_id: FileId, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    return file_object(await visible_file(state, caller, file_id))


def _open(storage: FileStorage, file_id: str) -> tuple[BinaryIO, int]:
    fh = storage.open(file_id)
    return fh, os.fstat(fh.fileno()).st_size


async def _chunks(fh: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(fh.read, READ_CHUNK):
            yield chunk
    finally:
        fh.close()  # a read-only file: closing does not wait on the disk


def _disposition(filename: str) -> str:
    fallback = _UNSAFE.sub("_", filename) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"


@router.get("/{file_id}/content", response_class=StreamingResponse)
async def content(file_id: FileId, state: StateDep, caller: CallerDep) -> Response:
    """The file's bytes, as uploaded (or as the batch wrote them)."""
    row = await visible_file(state, caller, file_id)
    storage = FileStorage.from_settings(state.settings)
    try:
        fh, size = await asyncio.to_thread(_open, storage, file_id)
    except FileNotFoundError:
        # Deleted or pruned since the row was read (or the volume is not shared).
        log.warning("file %s has a row but no bytes in %s", file_id, storage.root)
        raise _not_found(file_id) from None
    except OSError as e:
        raise _storage_down(e) from e
    return StreamingResponse(
        _chunks(fh),
        media_type="application/octet-stream",
        headers={
            "content-length": str(size),
            "content-disposition": _disposition(row.filename),
            "cache-control": "no-store",
        },
    )


@router.delete("/{file_id}")
async def remove(file_id: FileId, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    """Delete the file, unless a batch that is still running reads it (409)."""
    await visible_file(state, caller, file_id)
    try:
        deleted = await read_db("files", lambda: delete_file(state.engine, file_id))
    except FileInUse:
        raise InvalidRequestError(
            f"File {file_id} is the input of a batch still in progress; cancel the batch "
            "or wait for it to end.",
            param="file_id",
            code="file_in_use",
            status=409,
        ) from None
    if not deleted:
        raise _not_found(file_id)
    try:
        await asyncio.to_thread(FileStorage.from_settings(state.settings).delete, file_id)
    except OSError as e:  # the row is gone: nobody can reach the bytes; the log says so
        log.warning("file %s deleted, its bytes stay on disk: %s", file_id, e)
    return {"id": file_id, "object": "file", "deleted": True}
