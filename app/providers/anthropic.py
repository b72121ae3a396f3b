"""Anthropic's Messages API, behind the OpenAI chat shapes the gateway speaks.

Request and response translation live in `anthropic_translate` (pure functions); this
module owns the transport (URL, headers, the event-stream loop) and `StreamTranslator`,
the small state machine that turns Anthropic's stream events into OpenAI chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from app.errors import UpstreamError, sanitise
from app.providers.anthropic_translate import (
    anthropic_error_reader,
    finish_reason,
    from_anthropic,
    int_or_zero,
    prompt_tokens_of,
    to_anthropic,
    usage_of,
)
from app.providers.base import JSON, ChatCall, EmbedCall, chunk, unsupported_embeddings
from app.providers.http import open_sse, parse_event, post_json

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
            on_headers=call.on_headers,
        )
        return from_anthropic(answer, call.deployment.model)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        # Translated first: a request Anthropic cannot take fails before any connection.
        body = to_anthropic(call.request, call.deployment.model, stream=True)
        translator = StreamTranslator(call.deployment.model, call.secret)
        async with open_sse(
            self._session,
            self._url(call),
            headers=self._headers(call.secret),
            body=body,
            timeout_s=call.timeout_s,
            reader=anthropic_error_reader,
            secret=call.secret,
            on_headers=call.on_headers,
        ) as events:
            async for _name, data in events:
                for out in translator.feed(parse_event(data)):
                    yield out
                if translator.finished:
                    return
        raise UpstreamError("upstream stream ended before message_stop", code="stream_interrupted")

    async def embed(self, call: EmbedCall) -> JSON:
        raise unsupported_embeddings("anthropic")


class StreamTranslator:
    """Turns Anthropic stream events into `chat.completion.chunk` objects, one event at a time.

    Tool-call indexes count tool_use blocks only: OpenAI clients index `tool_calls`
    from 0, while Anthropic's block index also counts the text blocks before them.
    """

    def __init__(self, model: str, secret: str) -> None:
        self.model = model
        self.finished = False
        self._secret = secret
        self._tool_index: dict[int, int] = {}
        self._prompt = 0
        self._cached = 0
        self._completion = 0

    def feed(self, event: JSON) -> list[JSON]:
        kind = event.get("type")
        if kind == "message_start":
            return self._start(event.get("message"))
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._delta(event)
        if kind == "message_delta":
            self._count(event.get("usage"))
            delta = event.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            return [self._chunk({}, finish_reason(stop) or "stop")]
        if kind == "message_stop":
            self.finished = True
            return [
                chunk(
                    model=self.model, usage=usage_of(self._prompt, self._completion, self._cached)
                )
            ]
        if kind == "error":
            message, code, _ = anthropic_error_reader(event)
            detail = sanitise(message or code or "unknown", self._secret)
            raise UpstreamError(f"upstream stream error: {detail}")
        # ping, content_block_stop, and event types Anthropic may add later carry nothing
        # a chat client needs.
        return []

    def _chunk(self, delta: JSON, finish: str | None = None) -> JSON:
        return chunk(model=self.model, delta=delta, finish_reason=finish)

    def _count(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        # Counts are cumulative; message_delta may repeat the input counts, or omit them.
        if "input_tokens" in raw:
            self._prompt = prompt_tokens_of(raw)
            self._cached = int_or_zero(raw.get("cache_read_input_tokens"))
        if "output_tokens" in raw:
            self._completion = int_or_zero(raw.get("output_tokens"))

    def _start(self, message: Any) -> list[JSON]:
        if isinstance(message, dict):
            self.model = str(message.get("model") or self.model)
            self._count(message.get("usage"))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, event: JSON) -> list[JSON]:
        block = event.get("content_block")
        if not isinstance(block, dict):
            return []
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": str(block["text"])})]
        if block.get("type") != "tool_use":
            return []
        index = len(self._tool_index)
        self._tool_index[int_or_zero(event.get("index"))] = index
        call = {
            "index": index,
            "id": str(block.get("id", "")),
            "type": "function",
            "function": {"name": str(block.get("name", "")), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _delta(self, event: JSON) -> list[JSON]:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return []
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": str(delta["text"])})]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            index = self._tool_index.get(int_or_zero(event.get("index")))
            if index is None:
                raise UpstreamError("upstream sent tool input for an unknown content block")
            call = {"index": index, "function": {"arguments": str(delta["partial_json"])}}
            return [self._chunk({"tool_calls": [call]})]
        # thinking_delta and signature_delta stay inside the gateway.
        return []
