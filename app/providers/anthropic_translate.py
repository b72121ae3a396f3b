"""Pure translation between OpenAI chat shapes and Anthropic's Messages API.

Kept apart from the transport so every mapping is unit-tested without a network (the
stream's event-by-event translation, which carries state, lives with the transport).
Requests are built from the validated `ChatCompletionRequest` (not the raw body): the
Messages API has its own field names, so nothing can be passed through blindly.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.errors import InvalidRequestError, UpstreamError
from app.providers.base import JSON, completion, usage
from app.schemas.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    Content,
    DeveloperMessage,
    FilePart,
    ImagePart,
    NamedToolChoice,
    RefusalPart,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
    text_of,
)

# Anthropic requires `max_tokens`; OpenAI does not, so a request without a limit gets this.
DEFAULT_MAX_TOKENS = 4096

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def anthropic_error_reader(body: Any) -> tuple[str | None, str | None, str | None]:
    """(message, code, param) from `{"type": "error", "error": {"type", "message"}}`."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, None, None
    message = err.get("message")
    kind = err.get("type")
    return (
        message if isinstance(message, str) and message else None,
        kind if isinstance(kind, str) and kind else None,
        None,
    )


# ---------------------------------------------------------------- request translation


def to_anthropic(request: ChatCompletionRequest, model: str, *, stream: bool) -> JSON:
    """The Messages API body for an OpenAI chat request."""
    if request.n is not None and request.n > 1:
        raise InvalidRequestError("anthropic answers one choice only; n must be 1", param="n")
    body: JSON = {
        "model": model,
        "messages": _messages(request),
        "max_tokens": request.output_limit or DEFAULT_MAX_TOKENS,
    }
    system = _system(request)
    if system:
        body["system"] = system
    if stream:
        body["stream"] = True
    if request.temperature is not None:
        # OpenAI allows up to 2, Anthropic up to 1: clamp rather than fail a portable request.
        body["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else request.stop
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.tools:
        body["tools"] = [
            {
                "name": t.function.name,
                **({"description": t.function.description} if t.function.description else {}),
                "input_schema": t.function.parameters or {"type": "object", "properties": {}},
            }
            for t in request.tools
        ]
        if choice := _tool_choice(request):
            body["tool_choice"] = choice
    # seed, penalties, logit_bias and logprobs have no Anthropic counterpart; they are
    # dropped rather than refused so clients written for OpenAI keep working.
    return body


def _system(request: ChatCompletionRequest) -> str:
    parts = [
        text_of(m.content)
        for m in request.messages
        if isinstance(m, SystemMessage | DeveloperMessage)
    ]
    # Anthropic has no JSON mode: the closest faithful equivalent is an instruction in the
    # system prompt. The quality rules then score answers that still fail to parse.
    fmt = request.response_format
    if isinstance(fmt, ResponseFormatJSONSchema):
        schema = orjson.dumps(fmt.json_schema.schema_ or {"type": "object"}).decode()
        parts.append(
            "Respond with only a JSON value, no prose and no code fences, that validates "
            f"against this JSON schema named {fmt.json_schema.name!r}: {schema}"
        )
    elif isinstance(fmt, ResponseFormatJSONObject):
        parts.append("Respond with only a valid JSON object, no prose and no code fences.")
    return "\n\n".join(p for p in parts if p)


def _tool_choice(request: ChatCompletionRequest) -> JSON | None:
    choice = request.tool_choice
    out: JSON
    if choice is None or choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, NamedToolChoice):
        name = choice.function.get("name")
        if not name:
            raise InvalidRequestError(
                "tool_choice.function.name is required", param="tool_choice.function.name"
            )
        out = {"type": "tool", "name": name}
    if request.parallel_tool_calls is False:
        out["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # Anthropic's default is already `auto`.
    return out


def _messages(request: ChatCompletionRequest) -> list[JSON]:
    """Alternating user/assistant turns; consecutive turns of one role are merged."""
    turns: list[JSON] = []
    for i, message in enumerate(request.messages):
        if isinstance(message, SystemMessage | DeveloperMessage):
            continue
        if isinstance(message, UserMessage):
            role, blocks = "user", _blocks(message.content, f"messages[{i}].content")
        elif isinstance(message, AssistantMessage):
            role, blocks = "assistant", _assistant_blocks(message, i)
        elif isinstance(message, ToolMessage):
            role, blocks = "user", [_tool_result(message, i)]
        else:
            raise InvalidRequestError(
                "legacy function messages are not supported by anthropic; use tool messages",
                param=f"messages[{i}].role",
            )
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        # Anthropic wants a user turn's tool results before any text that follows them.
        turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return turns


def _blocks(content: Content | None, where: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[JSON] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, RefusalPart):
            blocks.append({"type": "text", "text": part.refusal})
        elif isinstance(part, ImagePart):
            blocks.append(_image(part.image_url.url, f"{where}[{j}].image_url.url"))
        elif isinstance(part, FilePart):
            blocks.append(_document(part.file, f"{where}[{j}].file"))
        else:
            raise InvalidRequestError(
                f"content part type {part.type!r} is not supported by anthropic",
                param=f"{where}[{j}].type",
            )
    return blocks


def _data_url(url: str, param: str) -> tuple[str, str]:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL."""
    header, sep, data = url.partition(",")
    media_type, _, encoding = header[5:].partition(";")
    if not sep or encoding != "base64" or not media_type or not data:
        raise InvalidRequestError(
            "data URLs must look like data:<media type>;base64,<data>", param=param
        )
    return media_type, data


def _image(url: str, param: str) -> JSON:
    if url.startswith("data:"):
        media_type, data = _data_url(url, param)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequestError("image_url must be an http(s) or data: URL", param=param)


def _document(file: dict[str, Any], param: str) -> JSON:
    # OpenAI's inline file part (`file_data` as a data URL) maps to a document block;
    # uploaded `file_id`s live in OpenAI's storage and cannot be forwarded.
    data_url = file.get("file_data")
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise InvalidRequestError(
            "anthropic accepts files only as file_data data: URLs", param=param
        )
    media_type, data = _data_url(data_url, f"{param}.file_data")
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }


def _assistant_blocks(message: AssistantMessage, i: int) -> list[JSON]:
    blocks = _blocks(message.content, f"messages[{i}].content")
    if message.refusal and not blocks:
        blocks.append({"type": "text", "text": message.refusal})
    for j, call in enumerate(message.tool_calls or []):
        param = f"messages[{i}].tool_calls[{j}].function.arguments"
        raw = call.function.arguments.strip()
        try:
            # Some clients send "" for a call without arguments; Anthropic wants an object.
            arguments = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise InvalidRequestError(
                "tool call arguments must be valid JSON", param=param, code="invalid_value"
            ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                "tool call arguments must be a JSON object", param=param, code="invalid_value"
            )
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments}
        )
    return blocks


def _tool_result(message: ToolMessage, i: int) -> JSON:
    content: str | list[JSON] = (
        message.content
        if isinstance(message.content, str)
        else _blocks(message.content, f"messages[{i}].content")
    )
    return {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": content}


# --------------------------------------------------------------- response translation


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return _FINISH.get(str(stop_reason), "stop")


def int_or_zero(value: Any) -> int:
    """A token count from an answer that may omit it (or, in a broken answer, mangle it)."""
    return value if isinstance(value, int) else 0


def prompt_tokens_of(raw: Any) -> int:
    """Anthropic counts cached input apart; OpenAI's prompt_tokens includes it."""
    if not isinstance(raw, dict):
        return 0
    return (
        int_or_zero(raw.get("input_tokens"))
        + int_or_zero(raw.get("cache_read_input_tokens"))
        + int_or_zero(raw.get("cache_creation_input_tokens"))
    )


def usage_of(prompt: int, completion_tokens: int, cached: int) -> JSON:
    out = usage(prompt, completion_tokens)
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def from_anthropic(message: JSON, model: str) -> JSON:
    """A `chat.completion` for a Messages API answer."""
    blocks = message.get("content")
    if not isinstance(message.get("type"), str) or not isinstance(blocks, list):
        raise UpstreamError("upstream answered with an unexpected message shape")
    texts: list[str] = []
    calls: list[JSON] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name", "")),
                        "arguments": _arguments(block.get("input")),
                    },
                }
            )
        # thinking and server-tool blocks have no OpenAI counterpart and are left out.
    text = "".join(texts)
    out: JSON = {"role": "assistant", "content": text or None, "refusal": None}
    if calls:
        out["tool_calls"] = calls
    raw_usage = message.get("usage")
    cached = (
        int_or_zero(raw_usage.get("cache_read_input_tokens")) if isinstance(raw_usage, dict) else 0
    )
    completion_tokens = (
        int_or_zero(raw_usage.get("output_tokens")) if isinstance(raw_usage, dict) else 0
    )
    return completion(
        model=str(message.get("model") or model),
        message=out,
        finish_reason=finish_reason(message.get("stop_reason")) or "stop",
        usage=usage_of(prompt_tokens_of(raw_usage), completion_tokens, cached),
    )
