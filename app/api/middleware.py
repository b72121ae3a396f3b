"""Pure ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware on every request).

Gives every request an id, puts it on every response as `x-request-id`, and renders
any exception that escaped the handlers as an OpenAI-shaped 500 that still carries it.
Guards what FastAPI serves (the fast path reads its own bodies, under the same limit):
bodies past the size limit, and NUL characters in the URL.
"""

from __future__ import annotations

import logging
import secrets

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import GatewayError, InvalidRequestError, PayloadTooLargeError, error_response
from app.observability.logging import REQUEST_ID

log = logging.getLogger("flywheel.http")

CHAT_PATH = "/v1/chat/completions"


def new_request_id(path: str) -> str:
    # The chat completion `id` is the request id, so it takes OpenAI's prefix there.
    prefix = "chatcmpl-" if path == CHAT_PATH else "req-"
    return prefix + secrets.token_hex(12)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(scope["path"])
        REQUEST_ID.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope["path"])
            response = error_response(GatewayError("internal gateway error", code="internal_error"))
            await response(scope, receive, send_with_id)


class RequestGuard:
    """FastAPI reads a body whole, before any dependency (authentication included) runs:
    without a limit, anyone could make a replica buffer gigabytes, or wait forever on a
    declared length that never comes. Over `max_body` bytes is a 413, on the declared
    length before anything is read, else as the body streams in (`exempt` paths, the
    file uploads, have limits of their own). A NUL in the path or query is a 400: no id
    or name holds one, and the database could not look one up."""

    def __init__(self, app: ASGIApp, max_body: int, exempt: frozenset[str]) -> None:
        self.app = app
        self.max_body = max_body
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            refusal = InvalidRequestError("the URL holds a NUL character", code="invalid_url")
            await error_response(refusal)(scope, receive, send)
            return
        if scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await error_response(self._too_large())(scope, receive, send)
            return
        size = 0

        async def limited() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.max_body:
                # An HTTPException, which FastAPI's body parsing lets through (any other
                # exception there becomes a 400) to the handler that renders it as a 413.
                raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body is larger than the limit of {self.max_body} bytes"
        )
