"""Pure ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware on every request).

Gives every request an id, puts it on every response as `x-request-id`, and renders
any exception that escaped the handlers as an OpenAI-shaped 500 that still carries it.
"""

from __future__ import annotations

import logging
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import GatewayError, error_response
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
