"""The hot endpoints served straight from ASGI, ahead of FastAPI's stack.

Measured on the 2-core benchmark machine (`make bench`): a constant FastAPI endpoint
serves ~3,400 requests/s while the same endpoint as a bare ASGI callable serves ~19,000;
FastAPI's routing, dependency solving and middleware layers cost ~0.25 ms a request,
more than the whole gateway's budget. So POST /v1/chat/completions and /v1/embeddings
go from `Gateway.__call__` straight to their handlers, which are the same functions the
FastAPI routes call (those routes still exist, for the OpenAPI docs). Everything else,
and every non-POST method, goes through FastAPI as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api import chat, embeddings
from app.api.body import BodyReader, receive_body
from app.api.middleware import new_request_id
from app.api.responses import EventStream
from app.errors import GatewayError, error_response
from app.observability.logging import REQUEST_ID
from app.observability.tracing import mark_error, set_attributes
from app.state import AppState

log = logging.getLogger("flywheel.http")

Handler = Callable[[AppState, str, BodyReader, Mapping[str, str]], Awaitable[Response]]
ARM_DELAY_S = 0.05
FAST: dict[str, Handler] = {chat.PATH: chat.handle, embeddings.PATH: embeddings.handle}


class Gateway(FastAPI):
    in_flight = 0  # requests in the fast path now (flywheel_requests_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Per client address, before anything else (authentication included), for
            # every endpoint: one in-memory counter update.
            refused = self.state.flywheel.http_limits.check_client(scope)
            if refused is not None:
                await error_response(refused)(scope, receive, send)
                return
            if scope["method"] == "POST":
                handler = FAST.get(scope["path"])
                if handler is not None:
                    await self._fast(handler, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _fast(self, handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState = self.state.flywheel
        headers = Headers(scope=scope)
        self.in_flight += 1
        try:
            # The span covers sending too: a stream's body (and its record) runs in it.
            with state.tracing.server_span("POST " + scope["path"], headers) as span:
                status = await self._answer(handler, state, headers, scope, receive, send)
                if status is not None and span.is_recording():
                    attributes = {"http.request.method": "POST", "http.route": scope["path"]}
                    set_attributes(span, {**attributes, "http.response.status_code": status})
                    mark_error(span, status, None)
        finally:
            self.in_flight -= 1

    async def _answer(
        self,
        handler: Handler,
        state: AppState,
        headers: Headers,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> int | None:
        rid = new_request_id(scope["path"])
        REQUEST_ID.set(rid)  # for every line logged while serving it
        watcher = _DisconnectWatcher(receive)
        try:
            read = receive_body(receive, on_end=watcher.start)
            response = await handler(state, rid, read, headers)
        except GatewayError as e:
            response = error_response(e)
        except ClientDisconnect:
            return None
        except asyncio.CancelledError:
            if watcher.fired:
                # The client left while the upstream was still working: it has been
                # cancelled (the handler recorded it); nobody is left to answer.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                return None
            raise
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            response = error_response(GatewayError("internal gateway error", code="internal_error"))
        finally:
            watcher.stop()
        if watcher.fired:
            # The client left as the answer came: nobody to send it to.
            if isinstance(response, EventStream) and response.abandon is not None:
                await response.abandon()
            return None
        response.raw_headers.append((b"x-request-id", rid.encode()))
        await response(scope, receive, send)
        return response.status_code


class _DisconnectWatcher:
    """Cancels the request's task if the client disconnects before the response starts.

    Armed only once the body is read, so it never takes body messages from the handler;
    stopped before the response is sent (a streaming response listens for disconnects
    itself). The listening task is only made for requests still running after
    `ARM_DELAY_S`: most answers come sooner, and a task per request showed in profiles.
    """

    __slots__ = ("_receive", "_request", "_task", "_timer", "fired")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._request = asyncio.current_task()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.fired = False

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(ARM_DELAY_S, self._listen)

    def _listen(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect" and self._request is not None:
            self.fired = True
            self._request.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
