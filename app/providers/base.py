"""What every provider adapter offers, and what it is given.

Adapters speak OpenAI's shapes to the rest of the gateway: `complete` returns a
`chat.completion` object, `stream` yields `chat.completion.chunk` objects (the last one
may carry only `usage`), `embed` returns an embeddings `list`. Each adapter translates
its provider's errors into `app.errors` exceptions and lets nothing else escape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import SecretStr

from app.errors import InvalidRequestError
from app.routing.config import DeploymentConfig
from app.schemas.chat import ChatCompletionRequest
from app.schemas.embeddings import EmbeddingRequest

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a call goes: the chosen deployment, its key and the time it may take."""

    deployment: DeploymentConfig
    api_key: SecretStr | None
    timeout_s: float
    request_id: str
    # Sees the upstream's response headers: rate-limit hints pace the deployment.
    on_headers: Callable[[Mapping[str, str]], None] | None = None

    @property
    def secret(self) -> str:
        return self.api_key.get_secret_value() if self.api_key else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCall(Upstream):
    request: ChatCompletionRequest
    # The client's body as it came (unknown fields included), for pass-through upstreams.
    body: JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedCall(Upstream):
    request: EmbeddingRequest
    body: JSON


class Provider(Protocol):
    async def complete(self, call: ChatCall) -> JSON: ...

    def stream(self, call: ChatCall) -> AsyncIterator[JSON]: ...

    async def embed(self, call: EmbedCall) -> JSON: ...


def unsupported_embeddings(provider: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"provider {provider!r} does not offer embeddings",
        param="model",
        code="unsupported_model",
    )


def well_formed(obj: JSON, *, part: str) -> bool:
    """Does an upstream object have OpenAI's shape where the gateway reads it?

    `part` is "message" for a completion, "delta" for a stream chunk. Pass-through
    upstreams are checked with this, so a malformed answer is a 502, not a crash.
    """
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get(part, {}), dict):
            return False
    usage = obj.get("usage")
    return usage is None or isinstance(usage, dict)


def completion(
    *,
    model: str,
    message: JSON,
    finish_reason: str | None,
    usage: JSON | None,
    created: int | None = None,
) -> JSON:
    """A `chat.completion` object of one choice, for adapters that translate."""
    return {
        "id": "",
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": usage,
    }


def chunk(
    *,
    model: str,
    delta: JSON | None = None,
    finish_reason: str | None = None,
    usage: JSON | None = None,
    created: int | None = None,
) -> JSON:
    """A `chat.completion.chunk`; with `delta=None` a usage-only chunk with no choices."""
    out: JSON = {
        "id": "",
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
