"""Deterministic quality rules: a score in [0, 1] for one answer, with the reason.

The virtuous cycle scores every answer with these; ensembles use them to break ties.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.schemas.chat import ChatCompletionRequest

REFUSAL_MARKERS = (
    "i'm sorry, but i can't",
    "i am sorry, but i can't",
    "i cannot help with",
    "i can't help with",
    "i can't assist",
    "i cannot assist",
    "i won't be able to",
)


def rule_score(request: ChatCompletionRequest, completion: dict[str, Any]) -> tuple[float, str]:
    choices = completion.get("choices") or []
    if not choices:
        return 0.0, "no_choices"
    choice = choices[0]
    message = choice.get("message") or {}
    content = message.get("content") or ""
    tool_calls = message.get("tool_calls") or []
    for call in tool_calls:
        try:
            orjson.loads((call.get("function") or {}).get("arguments") or "")
        except orjson.JSONDecodeError:
            return 0.1, "malformed_tool_arguments"
    if not content.strip() and not tool_calls:
        return 0.0, "empty"
    if choice.get("finish_reason") == "length":
        return 0.3, "truncated"
    if any(marker in content.lower() for marker in REFUSAL_MARKERS):
        return 0.2, "refusal"
    fmt = request.response_format
    if fmt is not None and fmt.type != "text" and not tool_calls:
        try:
            orjson.loads(content)
        except orjson.JSONDecodeError:
            return 0.1, "invalid_json"
    return 1.0, "ok"
