"""Provider calls for a chosen target: one place that fills in what the router decided."""

from __future__ import annotations

from typing import Any

from app.providers.base import ChatCall, EmbedCall
from app.routing.router import Target
from app.schemas.chat import ChatCompletionRequest
from app.schemas.embeddings import EmbeddingRequest


def chat_call(
    target: Target, chat: ChatCompletionRequest, body: dict[str, Any], request_id: str
) -> ChatCall:
    return ChatCall(
        request=chat,
        body=body,
        deployment=target.deployment,
        api_key=target.api_key,
        timeout_s=target.timeout_s,
        on_headers=target.on_headers,
        request_id=request_id,
    )


def embed_call(
    target: Target, req: EmbeddingRequest, body: dict[str, Any], request_id: str
) -> EmbedCall:
    return EmbedCall(
        request=req,
        body=body,
        deployment=target.deployment,
        api_key=target.api_key,
        timeout_s=target.timeout_s,
        on_headers=target.on_headers,
        request_id=request_id,
    )
