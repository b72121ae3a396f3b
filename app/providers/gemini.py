"""Google's Gemini API (generateContent), behind the OpenAI shapes the gateway speaks.

The translation lives in `gemini_translate` (pure functions, unit-tested); this module
owns the transport: URLs, the key header, and the event-stream loop. The key travels
only in `x-goog-api-key`: Google also accepts `?key=`, but a URL ends up in proxy logs,
traces and error messages, so it is never used.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import cast

import aiohttp

from app.errors import UpstreamError, sanitise
from app.providers.base import JSON, ChatCall, EmbedCall
from app.providers.gemini_translate import (
    StreamTranslator,
    google_error_reader,
    model_path,
    to_completion,
    to_embed_request,
    to_embeddings,
    to_gemini_request,
)
from app.providers.http import parse_event, post_json, sse_data, stream_lines
from app.routing.config import DeploymentConfig

GEMINI_BASE = "https://generativelanguage.googleapis.com"
# The API version whose shapes the translation follows; v1 lacks systemInstruction
# and tool config on older models.
GEMINI_VERSION = "v1beta"


def gemini_url(deployment: DeploymentConfig, method: str) -> str:
    root = (deployment.api_base or GEMINI_BASE).rstrip("/")
    # Operators often paste the versioned base from Google's docs; accept both forms.
    if not root.endswith(("/v1beta", "/v1")):
        root = f"{root}/{GEMINI_VERSION}"
    return f"{root}/{urllib.parse.quote(model_path(deployment.model), safe='/')}:{method}"


class GeminiProvider:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @staticmethod
    def _headers(secret: str) -> dict[str, str]:
        return {"x-goog-api-key": secret} if secret else {}

    async def complete(self, call: ChatCall) -> JSON:
        answer = await post_json(
            self._session,
            gemini_url(call.deployment, "generateContent"),
            headers=self._headers(call.secret),
            body=to_gemini_request(call.request),
            timeout_s=call.timeout_s,
            reader=google_error_reader,
            secret=call.secret,
        )
        return to_completion(answer, call.deployment.model)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        # Translated first: a request Gemini cannot take fails before any connection.
        body = to_gemini_request(call.request)
        translator = StreamTranslator(call.deployment.model)
        # http.py types its generators as iterators; they are generators, which can close.
        lines = cast(
            AsyncGenerator[bytes, None],
            stream_lines(
                self._session,
                gemini_url(call.deployment, "streamGenerateContent") + "?alt=sse",
                headers=self._headers(call.secret),
                body=body,
                timeout_s=call.timeout_s,
                reader=google_error_reader,
                secret=call.secret,
            ),
        )
        events = cast(AsyncGenerator[tuple[str, bytes], None], sse_data(lines))
        # Closing both generators explicitly releases the connection as soon as the
        # consumer goes away, instead of whenever GC finalises them.
        async with aclosing(lines), aclosing(events):
            async for _name, data in events:
                event = parse_event(data)
                if "error" in event:
                    message, _, _ = google_error_reader(event)
                    detail = sanitise(message or "unknown", call.secret)
                    raise UpstreamError(f"upstream stream error: {detail}")
                for out in translator.feed(event):
                    yield out
        # Gemini sends no [DONE]: a finish reason is the only proof the answer is whole.
        if not translator.finished:
            raise UpstreamError(
                "upstream stream ended before a finish reason", code="stream_interrupted"
            )
        if (last := translator.usage_chunk()) is not None:
            yield last

    async def embed(self, call: EmbedCall) -> JSON:
        texts = call.request.texts
        answer = await post_json(
            self._session,
            gemini_url(call.deployment, "batchEmbedContents"),
            headers=self._headers(call.secret),
            body=to_embed_request(call.deployment.model, texts, call.request.dimensions),
            timeout_s=call.timeout_s,
            reader=google_error_reader,
            secret=call.secret,
        )
        return to_embeddings(answer, call.deployment.model, texts, call.request.encoding_format)
