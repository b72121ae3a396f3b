"""OpenAI's Batch API: create, retrieve, list and cancel batches (`/v1/batches`).

This side only records the request: a batch is created `validating` and the workers,
polling the table, validate and run it. A batch belongs to the key that created it;
another key gets a 404 (nothing says it exists), the master key sees and manages every
batch. Callers without a virtual key (the master key, and anonymous callers where keys
are optional) own batches and files as `owner` None.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from app.api.auth import Caller
from app.api.body import read_json_object, request_body, validate
from app.api.cycle import read_db
from app.api.files import visible_file
from app.deps import CallerDep, StateDep
from app.errors import InvalidRequestError, NotFoundError
from app.schemas.storable import storable_json
from app.state import AppState
from app.store.batches import (
    UNCANCELLABLE,
    batch_object,
    cancel_batch,
    create_batch,
    get_batch,
    list_batches,
)
from app.store.schema import Batch

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MAX_BODY = 64 * 1024
MAX_PAIRS, MAX_KEY, MAX_VALUE = 16, 64, 512  # OpenAI's metadata limits
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")


class BatchConflict(InvalidRequestError):
    status = 409
    code = "batch_not_cancellable"


class OutputExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 24 * 3600)  # OpenAI's bounds: 1 hour to 30 days


class BatchCreate(BaseModel):
    # Strict: a number where a string belongs is a 400, not quietly converted.
    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    output_expires_after: OutputExpiresAfter | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # Checked here rather than by constrained types, whose errors quote the key.
        if value is not None:
            if len(value) > MAX_PAIRS:
                raise ValueError(f"at most {MAX_PAIRS} key-value pairs")
            if any(len(k) > MAX_KEY for k in value):
                raise ValueError(f"keys are at most {MAX_KEY} characters")
            if any(len(v) > MAX_VALUE for v in value.values()):
                raise ValueError(f"values are at most {MAX_VALUE} characters")
            storable_json(value)
        return value


BATCH_CREATE = TypeAdapter(BatchCreate)


BatchId = Annotated[str, Path(max_length=64)]


def _not_found(batch_id: str) -> NotFoundError:
    return NotFoundError(f"No batch found with id '{batch_id}'.", code="batch_not_found")


async def _visible(state: AppState, caller: Caller, batch_id: str) -> Batch:
    if BATCH_ID.fullmatch(batch_id) is None:
        raise _not_found(batch_id)
    row = await read_db("batches", lambda: get_batch(state.engine, batch_id))
    if row is None or not caller.owns(row.owner):
        raise _not_found(batch_id)
    return row


async def _input_lines(state: AppState, caller: Caller, file_id: str) -> int:
    """The number of requests in the batch's input file, once it is found usable."""
    # Another key's file, and an expired one, are not found: as the Files API says.
    file = await visible_file(state, caller, file_id, param="input_file_id")

    def bad(message: str, code: str) -> InvalidRequestError:
        return InvalidRequestError(message, param="input_file_id", code=code)

    if file.purpose != "batch":
        raise bad(
            f"File '{file_id}' has purpose '{file.purpose}': a batch needs one uploaded "
            "with purpose 'batch'.",
            "invalid_file_purpose",
        )
    if file.status != "processed":
        raise bad(f"File '{file_id}' is not ready (status '{file.status}').", "file_not_ready")
    if file.lines <= 0:
        raise bad(f"File '{file_id}' holds no requests.", "empty_file")
    limit = state.settings.flywheel_batch_max_requests
    if file.lines > limit:
        raise bad(
            f"File '{file_id}' holds {file.lines} requests; a batch takes at most {limit}.",
            "too_many_requests",
        )
    return file.lines


@router.post("")
async def batch_create(request: Request, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    length = request.headers.get("content-length")
    body = await read_json_object(request_body(request), length, MAX_BODY)
    spec = validate(BATCH_CREATE, body)
    now = datetime.now(UTC)
    total = await _input_lines(state, caller, spec.input_file_id)
    expires = spec.output_expires_after
    row = await read_db(
        "batches",
        lambda: create_batch(
            state.engine,
            owner=caller.owner,
            endpoint=spec.endpoint,
            input_file_id=spec.input_file_id,
            completion_window=spec.completion_window,
            metadata=spec.metadata,
            output_expires_s=None if expires is None else expires.seconds,
            total=total,
            now=now,
        ),
    )
    return batch_object(row)


@router.get("")
async def batch_list(
    state: StateDep,
    caller: CallerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows, more = await read_db(
        "batches",
        lambda: list_batches(
            state.engine, owner=caller.owner, everyone=caller.master, after=after, limit=limit
        ),
    )
    data = [batch_object(r) for r in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.get("/{batch_id}")
async def batch_get(state: StateDep, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    return batch_object(await _visible(state, caller, batch_id))


@router.post("/{batch_id}/cancel")
async def batch_cancel(state: StateDep, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    """`cancelling` until the worker stops it (`cancelled`); asking again is harmless."""
    await _visible(state, caller, batch_id)
    now = datetime.now(UTC)
    row = await read_db("batches", lambda: cancel_batch(state.engine, batch_id, now))
    if row is None:
        raise _not_found(batch_id)
    if row.status in UNCANCELLABLE:
        raise BatchConflict(f"Cannot cancel a batch with status '{row.status}'.")
    return batch_object(row)
