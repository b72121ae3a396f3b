"""Reading, parsing and validating request bodies with OpenAI-shaped errors.

Handlers read the body themselves (instead of FastAPI's model binding) so the size limit
holds before the body is buffered, malformed JSON gets a clear 400, and the raw object
is kept for pass-through to OpenAI-compatible upstreams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from app.errors import InvalidRequestError, PayloadTooLargeError, validation_error

T = TypeVar("T")


async def receive_chunks(
    receive: Receive, on_end: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """The request body straight from ASGI `receive`, for the fast path.

    `on_end` runs once the whole body is in: from then on `receive` only ever says
    whether the client is still there.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            if on_end is not None:
                on_end()
            return


async def read_json_object(
    source: AsyncIterator[bytes], declared: str | None, limit: int
) -> dict[str, Any]:
    """The body as a JSON object; `declared` is the Content-Length header, if any."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in source:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
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
    return body


def openapi_body(schema: str) -> dict[str, Any]:
    """`openapi_extra` for a handler that reads its body itself: the docs still show it."""
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def validate(adapter: TypeAdapter[T], body: dict[str, Any]) -> T:
    try:
        return adapter.validate_python(body)
    except ValidationError as e:
        raise validation_error(list(e.errors(include_url=False))) from e


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
