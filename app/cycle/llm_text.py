"""Text to and from the cycle's own LLM calls (the judge and the optimizer), without I/O.

Going in: a stored exchange (the request body as sent upstream and the
`chat.completion` that answered it) as plain roles and text, clipped so that one huge
conversation cannot blow the caller's context window or budget. Coming back: the JSON
values in a model's reply, which models wrap in code fences and prose however they
are asked not to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from app.cycle.variants import PROMPT_ROLES

MESSAGE_CHARS = 4_000  # one message, before the conversation's own limit applies
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
# A reply is scanned for JSON from this many opening brackets at most: decoding from
# every bracket of a long reply of prose would be quadratic.
_MAX_STARTS = 64
_MAX_REPLY_CHARS = 200_000


def clip(text: str, limit: int) -> str:
    """`text` within `limit` characters, its head and tail kept: the question tends to
    open a message and what is asked of the answer to close it."""
    if len(text) <= limit:
        return text
    marker = " […] "
    half = max(0, (limit - len(marker)) // 2)
    return text[:half] + marker + text[len(text) - half :]


def content_text(content: Any) -> str:
    """A message's content as text; parts that are not text are named, not dropped, so
    a reader knows an image or a file was there."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        elif isinstance(kind, str):
            parts.append(f"[{kind}]")
    return "\n".join(parts)


def message_text(message: dict[str, Any]) -> str:
    """A message's text, its tool calls and its refusal, one per line."""
    lines = [content_text(message.get("content"))]
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            lines.append(f"[tool call] {fn.get('name')}({fn.get('arguments')})")
    refusal = message.get("refusal")
    if isinstance(refusal, str):
        lines.append(f"[refusal] {refusal}")
    return "\n".join(line for line in lines if line)


def conversation(request: Any, *, system: bool, limit: int) -> list[dict[str, str]]:
    """The request's messages as `{"role", "content"}` with text content, the newest
    ones kept within `limit` characters (the last turn is what was answered); system
    and developer messages only when `system`."""
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return []
    out: list[dict[str, str]] = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or (role in PROMPT_ROLES and not system):
            continue
        text = clip(message_text(m), MESSAGE_CHARS)
        if text:
            out.append({"role": role, "content": text})
    kept: list[dict[str, str]] = []
    total = 0
    for m in reversed(out):
        total += len(m["content"])
        if total > limit and kept:
            break
        kept.append(m)
    return kept[::-1]


def answer_text(response: Any, limit: int) -> str:
    """The first choice's message of a stored `chat.completion`, as text ("" if none)."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    message = choices[0].get("message")
    return clip(message_text(message), limit) if isinstance(message, dict) else ""


def json_values(text: str) -> Iterator[Any]:
    """The JSON values in a model's reply, most likely first: the contents of code
    fences, the whole reply, then values starting at each `{` or `[` in it."""
    text = text[:_MAX_REPLY_CHARS]
    decoder = json.JSONDecoder()
    for candidate in [*(m.group(1) for m in _FENCE.finditer(text)), text]:
        try:
            yield json.loads(candidate.strip())
        except ValueError:
            continue
    starts = [i for i, ch in enumerate(text) if ch in "{["][:_MAX_STARTS]
    for i in starts:
        try:
            value, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        yield value
