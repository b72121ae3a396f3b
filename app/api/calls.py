"""Provider calls for a chosen target: one place that fills in what the router decided."""

from __future__ import annotations

from typing import Any

from app.providers.base import ChatCall
from app.routing.router import Target
from app.schemas.chat import ChatCompletionRequest


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
