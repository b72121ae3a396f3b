"""OpenAI and every OpenAI-compatible server (Groq, Together, OpenRouter, vLLM, Ollama…).

The client's body is passed through as it came, unknown fields included, with only
`model` replaced, so new OpenAI parameters work without a gateway release.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from app.errors import UpstreamError, sanitise
from app.providers.base import JSON, ChatCall, EmbedCall, well_formed
from app.providers.http import (
    open_sse,
    openai_error_reader,
    parse_event,
    post_json,
    upstream_url,
)

OPENAI_BASE = "https://api.openai.com/v1"


class OpenAIProvider:
    def __init__(self, session: aiohttp.ClientSession, *, default_base: str | None) -> None:
        self._session = session
        self._default_base = default_base

    def _url(self, base: str | None, path: str) -> URL:
        root = base or self._default_base
        if root is None:
            raise UpstreamError("deployment has no api_base", code="misconfigured_deployment")
        return upstream_url(root, path)

    @staticmethod
    def _headers(secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"} if secret else {}

    async def complete(self, call: ChatCall) -> JSON:
        body = {**call.body, "model": call.deployment.model, "stream": False}
        body.pop("stream_options", None)
        result = await post_json(
            self._session,
            self._url(call.deployment.api_base, "/chat/completions"),
            headers=self._headers(call.secret),
            body=body,
            timeout_s=call.timeout_s,
            reader=openai_error_reader,
            secret=call.secret,
            on_headers=call.on_headers,
        )
        if not well_formed(result, part="message"):
            raise UpstreamError("upstream answered with an unexpected shape")
        return result

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        body = {**call.body, "model": call.deployment.model, "stream": True}
        if call.deployment.stream_usage:
            # Always ask for usage so the gateway can account it; the gateway drops the
            # usage chunk again when the client did not ask for it.
            options = body.get("stream_options") or {}
            body["stream_options"] = {**options, "include_usage": True}
        async with open_sse(
            self._session,
            self._url(call.deployment.api_base, "/chat/completions"),
            headers=self._headers(call.secret),
            body=body,
            timeout_s=call.timeout_s,
            reader=openai_error_reader,
            secret=call.secret,
            on_headers=call.on_headers,
        ) as events:
            async for _event, data in events:
                if data == b"[DONE]":
                    return
                parsed = parse_event(data)
                if "error" in parsed and "choices" not in parsed:
                    message, _, _ = openai_error_reader(parsed)
                    detail = sanitise(message or "unknown", call.secret)
                    raise UpstreamError(f"upstream stream error: {detail}")
                if not well_formed(parsed, part="delta"):
                    raise UpstreamError("upstream sent a stream chunk of an unexpected shape")
                yield parsed
        raise UpstreamError("upstream stream ended before [DONE]", code="stream_interrupted")

    async def embed(self, call: EmbedCall) -> JSON:
        return await post_json(
            self._session,
            self._url(call.deployment.api_base, "/embeddings"),
            headers=self._headers(call.secret),
            body={**call.body, "model": call.deployment.model},
            timeout_s=call.timeout_s,
            reader=openai_error_reader,
            secret=call.secret,
            on_headers=call.on_headers,
        )
