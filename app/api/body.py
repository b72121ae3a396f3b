"""Reading, parsing and validating request bodies with OpenAI-shaped errors.

Handlers read the body themselves (instead of FastAPI's model binding) so the size limit
holds before the body is buffered, malformed JSON gets a clear 400, and the raw object
is kept for pass-through to OpenAI-compatible upstreams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from app.errors import InvalidRequestError, PayloadTooLargeError, validation_error

T = TypeVar("T")
# orjson parses 1024 levels but writes only 254, and a body is written again to go
# upstream (translated into another provider's shape, a few levels deeper), hashed for
# the cache and kept for the records: past this, it is the client's 400, not a 500.
MAX_DEPTH = 200


# Reads the whole body, failing with 413 past the given limit.
BodyReader = Callable[[int], Awaitable[bytes]]


def receive_body(receive: Receive, on_end: Callable[[], None] | None = None) -> BodyReader:
    """The request body straight from ASGI `receive`, for the fast path.

    `on_end` runs once the whole body is in: from then on `receive` only ever says
    whether the client is still there. (A plain coroutine, not an async generator: this
    is on every request.)
    """

    async def read(limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                if on_end is not None:
                    on_end()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    return read


def request_body(request: Request) -> BodyReader:
    """The request body through Starlette, for the FastAPI routes."""

    async def read(limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    return read


async def read_json_object(read: BodyReader, declared: str | None, limit: int) -> dict[str, Any]:
    """The body as a JSON object; `declared` is the Content-Length header, if any."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    raw = await read(limit)
    if not raw.strip():
        raise InvalidRequestError(
            "the request body is empty; send a JSON object", code="invalid_json"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequestError(
            f"could not parse the JSON body of your request: {e.msg} at position {e.pos}",
            code="invalid_json",
        ) from e
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    # Counting brackets is cheap, and bounds the nesting: only a body with more of them
    # than the limit needs its depth measured.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(body, MAX_DEPTH):
        raise InvalidRequestError(
            f"the JSON body is nested more than {MAX_DEPTH} levels deep", code="invalid_json"
        )
    return body


def _deeper_than(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:  # not recursive: the nesting is as deep as the client made it
        item, depth = pending.pop()
        if depth > limit:
            return True
        inner = item.values() if isinstance(item, dict) else item
        pending.extend((v, depth + 1) for v in inner if isinstance(v, dict | list))
    return False


def openapi_body(schema: str, stream: bool = False) -> dict[str, Any]:
    """`openapi_extra` for a handler that reads its body itself: the docs still show it
    (and, for one that can stream, that its answer may be server-sent events)."""
    ref = {"$ref": f"#/components/schemas/{schema}"}
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}
    }
    if stream:
        content: dict[str, Any] = {
            "application/json": {"schema": {}},
            "text/event-stream": {"schema": {}},
        }
        extra["responses"] = {"200": {"description": "Successful Response", "content": content}}
    return extra


def validate(adapter: TypeAdapter[T], body: dict[str, Any]) -> T:
    try:
        return adapter.validate_python(body)
    except ValidationError as e:
        raise validation_error(list(e.errors(include_url=False))) from e


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
