"""Google's Gemini API (generateContent), behind the OpenAI shapes the gateway speaks.

Request and answer translation live in `gemini_translate` (pure functions); this module
owns the transport (URLs, the key header, the event-stream loop and what it carries over
between events), Google's error shape, and embeddings. The key travels only in
`x-goog-api-key`: Google also accepts `?key=`, but URLs end up in proxy logs, traces and
error messages, so that form is never used.
"""

from __future__ import annotations

import base64
import math
import struct
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from app.errors import UpstreamError, sanitise
from app.providers.base import JSON, ChatCall, EmbedCall, chunk
from app.providers.gemini_translate import (
    blocked,
    finish_reason,
    read_parts,
    read_usage,
    to_completion,
    to_gemini_request,
    tool_call,
)
from app.providers.http import open_sse, parse_event, post_json
from app.routing.config import DeploymentConfig

GEMINI_BASE = "https://generativelanguage.googleapis.com"
# The API version whose shapes the translation follows; v1 lacks systemInstruction
# and tool config on older models.
GEMINI_VERSION = "v1beta"


def model_path(model: str) -> str:
    """The resource name of a model: `models/x`, unless the deployment already gave one."""
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


def gemini_url(deployment: DeploymentConfig, method: str) -> str:
    root = (deployment.api_base or GEMINI_BASE).rstrip("/")
    # Operators often paste the versioned base from Google's docs; accept both forms.
    if not root.endswith(("/v1beta", "/v1")):
        root = f"{root}/{GEMINI_VERSION}"
    return f"{root}/{urllib.parse.quote(model_path(deployment.model), safe='/')}:{method}"


# Google's canonical status names, as the codes OpenAI clients know where one fits.
_CODE_FOR_STATUS = {
    "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
    "UNAUTHENTICATED": "invalid_api_key",
}


def google_error_reader(body: Any) -> tuple[str | None, str | None, str | None]:
    """(message, code, param) of Google's `{"error": {code, message, status, details}}`."""
    if isinstance(body, list) and body:
        body = body[0]  # the streaming endpoints wrap their error in a list
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, str):
        return err or None, None, None
    if not isinstance(err, dict):
        return None, None, None
    message = err.get("message") if isinstance(err.get("message"), str) else None
    status = err.get("status") if isinstance(err.get("status"), str) else None
    details = err.get("details")
    # Google answers a wrong key with 400 INVALID_ARGUMENT; only the reason tells it apart.
    if isinstance(details, list) and any(
        isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details
    ):
        return message or None, "invalid_api_key", None
    code = _CODE_FOR_STATUS.get(status, status.lower()) if status else None
    return message or None, code, None


class StreamTranslator:
    """Turns streamed `GenerateContentResponse` events into `chat.completion.chunk`s.

    Holds what spans events: which candidates have started and finished, how many
    function calls each has made (OpenAI's tool-call `index`), and the latest usage.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._calls: dict[int, int] = {}
        self._usage: JSON | None = None
        self._blocked = False

    @property
    def finished(self) -> bool:
        return self._blocked or (bool(self._started) and self._started <= self._finished)

    def feed(self, event: JSON) -> list[JSON]:
        self._usage = read_usage(event.get("usageMetadata")) or self._usage
        candidates = [c for c in event.get("candidates") or [] if isinstance(c, dict)]
        if not candidates and blocked(event):
            self._blocked = True
            return [*self._start(0), self._chunk(0, {}, "content_filter")]
        out: list[JSON] = []
        for position, candidate in enumerate(candidates):
            # proto3 JSON leaves out a zero `index`.
            out.extend(self._candidate(int(candidate.get("index", position)), candidate))
        return out

    def usage_chunk(self) -> JSON | None:
        return None if self._usage is None else chunk(model=self.model, usage=self._usage)

    def _candidate(self, index: int, candidate: JSON) -> list[JSON]:
        out = self._start(index)
        text, calls = read_parts(candidate)
        if text:
            out.append(self._chunk(index, {"content": text}))
        for call in calls:
            n = self._calls.get(index, 0)
            self._calls[index] = n + 1
            # Gemini sends each call whole, so one delta carries name and all arguments.
            out.append(self._chunk(index, {"tool_calls": [{"index": n, **tool_call(n, call)}]}))
        raw = candidate.get("finishReason")
        if isinstance(raw, str) and raw:
            self._finished.add(index)
            has_calls = self._calls.get(index, 0) > 0
            out.append(self._chunk(index, {}, finish_reason(raw, has_calls)))
        return out

    def _start(self, index: int) -> list[JSON]:
        if index in self._started:
            return []
        self._started.add(index)
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def _chunk(self, index: int, delta: JSON, finish: str | None = None) -> JSON:
        out = chunk(model=self.model, delta=delta, finish_reason=finish)
        out["choices"][0]["index"] = index
        return out


def to_embed_request(model: str, texts: list[str], dimensions: int | None) -> JSON:
    requests: list[JSON] = []
    for text in texts:
        item: JSON = {"model": model_path(model), "content": {"parts": [{"text": text}]}}
        if dimensions is not None:
            item["outputDimensionality"] = dimensions
        requests.append(item)
    return {"requests": requests}


def to_embeddings(resp: JSON, model: str, texts: list[str], encoding: str | None) -> JSON:
    """OpenAI's embeddings `list`; Gemini reports no token count, so it is estimated."""
    embeddings = resp.get("embeddings")
    if not isinstance(embeddings, list) or len(embeddings) != len(texts):
        raise UpstreamError("upstream answered with the wrong number of embeddings")
    data: list[JSON] = []
    for index, item in enumerate(embeddings):
        values = item.get("values") if isinstance(item, dict) else None
        if not isinstance(values, list):
            raise UpstreamError("upstream answered an embedding without values")
        vector: Any = values
        if encoding == "base64":
            # What OpenAI sends (and its SDK asks for by default): little-endian float32.
            vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = math.ceil(sum(len(t) for t in texts) / 4)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


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
            on_headers=call.on_headers,
        )
        return to_completion(answer, call.deployment.model)

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        # Translated first: a request Gemini cannot take fails before any connection.
        body = to_gemini_request(call.request)
        translator = StreamTranslator(call.deployment.model)
        async with open_sse(
            self._session,
            gemini_url(call.deployment, "streamGenerateContent") + "?alt=sse",
            headers=self._headers(call.secret),
            body=body,
            timeout_s=call.timeout_s,
            reader=google_error_reader,
            secret=call.secret,
            on_headers=call.on_headers,
        ) as events:
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
            on_headers=call.on_headers,
        )
        return to_embeddings(answer, call.deployment.model, texts, call.request.encoding_format)
