"""Anthropic's Messages API, behind the OpenAI chat shapes the gateway speaks.

The translation itself lives in `anthropic_translate` (pure functions, unit-tested);
this module owns only the transport: URL, headers, and the event-stream loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import cast

import aiohttp

from app.errors import UpstreamError
from app.providers.anthropic_translate import (
    StreamTranslator,
    anthropic_error_reader,
    from_anthropic,
    to_anthropic,
)
from app.providers.base import JSON, ChatCall, EmbedCall, unsupported_embeddings
from app.providers.http import parse_event, post_json, sse_data, stream_lines

ANTHROPIC_BASE = "https://api.anthropic.com"
# The API version this adapter's translation was written against; newer versions may
# change shapes, so it is pinned rather than taken from configuration.
ANTHROPIC_VERSION = "2023-06-01"


class AnthropicProvider:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @staticmethod
    def _url(call: ChatCall) -> str:
        return (call.deployment.api_base or ANTHROPIC_BASE).rstrip("/") + "/v1/messages"

    @staticmethod
    def _headers(secret: str) -> dict[str, str]:
        return {"x-api-key": secret, "anthropic-version": ANTHROPIC_VERSION}

    async def complete(self, call: ChatCall) -> JSON:
        answer = await post_json(
            self._session,
            self._url(call),
            headers=self._headers(call.secret),
            body=to_anthropic(call.request, call.deployment.model, stream=False),
            timeout_s=call.timeout_s,
            reader=anthropic_error_reader,
            secret=call.secret,
        )
        return from_anthropic(answer, call.deployment.model)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        # Translated first: a request Anthropic cannot take fails before any connection.
        body = to_anthropic(call.request, call.deployment.model, stream=True)
        translator = StreamTranslator(call.deployment.model, call.secret)
        # http.py types its generators as iterators; they are generators, which can close.
        lines = cast(
            AsyncGenerator[bytes, None],
            stream_lines(
                self._session,
                self._url(call),
                headers=self._headers(call.secret),
                body=body,
                timeout_s=call.timeout_s,
                reader=anthropic_error_reader,
                secret=call.secret,
            ),
        )
        events = cast(AsyncGenerator[tuple[str, bytes], None], sse_data(lines))
        # Closing both generators explicitly releases the connection as soon as the
        # message ends or the consumer goes away, instead of whenever GC finalises them.
        async with aclosing(lines), aclosing(events):
            async for _name, data in events:
                for out in translator.feed(parse_event(data)):
                    yield out
                if translator.finished:
                    return
        raise UpstreamError("upstream stream ended before message_stop", code="stream_interrupted")

    async def embed(self, call: EmbedCall) -> JSON:
        raise unsupported_embeddings("anthropic")
