"""Pure translation of chat requests and answers between OpenAI's shapes and Gemini's.

Gemini speaks `contents` of `parts` with the roles `user` and `model`, keeps the system
prompt apart (`systemInstruction`), names function results by function name rather than
by call id, and accepts only an OpenAPI subset of JSON Schema. Nothing here does I/O;
`app.providers.gemini` owns the HTTP, the stream loop, errors and embeddings.
"""

from __future__ import annotations

import base64
import secrets
import urllib.parse
from typing import Any

import orjson

from app.errors import InvalidRequestError, UpstreamError
from app.providers.base import JSON, completion, usage
from app.schemas.chat import (
    AssistantMessage,
    AudioPart,
    ChatCompletionRequest,
    Content,
    DeveloperMessage,
    FilePart,
    FunctionMessage,
    ImagePart,
    NamedToolChoice,
    RefusalPart,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SystemMessage,
    TextPart,
    Tool,
    ToolChoice,
    ToolMessage,
    UserMessage,
    text_of,
)

# ---------------------------------------------------------------- request


def to_gemini_request(request: ChatCompletionRequest) -> JSON:
    """A `GenerateContentRequest` body for an OpenAI chat request."""
    system: list[JSON] = []
    contents: list[JSON] = []
    # Gemini names a function result by the function's name; OpenAI by the call's id.
    names: dict[str, str] = {}
    for i, message in enumerate(request.messages):
        if isinstance(message, SystemMessage | DeveloperMessage):
            if text := text_of(message.content):
                system.append({"text": text})
            continue
        role, parts = _content_of(message, i, names)
        _append(contents, role, parts)
    if not contents:
        if not system:
            raise InvalidRequestError("messages carry no content to send", param="messages")
        # Gemini refuses a request without contents; a system-only prompt is the question.
        contents, system = [{"role": "user", "parts": system}], []
    body: JSON = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    if request.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(t) for t in request.tools]}]
        if (config := _tool_config(request.tool_choice)) is not None:
            body["toolConfig"] = config
    if generation := _generation_config(request):
        body["generationConfig"] = generation
    return body


def _content_of(
    message: UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    i: int,
    names: dict[str, str],
) -> tuple[str, list[JSON]]:
    if isinstance(message, UserMessage):
        return "user", _parts(message.content, f"messages[{i}].content")
    if isinstance(message, AssistantMessage):
        parts = _parts(message.content, f"messages[{i}].content")
        if message.refusal:
            parts.append({"text": message.refusal})
        for j, call in enumerate(message.tool_calls or []):
            names[call.id] = call.function.name
            args = _call_args(call.function.arguments, f"messages[{i}].tool_calls[{j}]")
            parts.append({"functionCall": {"name": call.function.name, "args": args}})
        return "model", parts
    if isinstance(message, ToolMessage):
        name = names.get(message.tool_call_id)
        if name is None:
            raise InvalidRequestError(
                f"tool_call_id {message.tool_call_id!r} matches no earlier assistant tool call",
                param=f"messages[{i}].tool_call_id",
            )
        return "user", [_function_response(name, message.content)]
    return "user", [_function_response(message.name, message.content)]


def _append(contents: list[JSON], role: str, parts: list[JSON]) -> None:
    # Gemini wants turns to alternate, and parallel function results in one turn.
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _parts(content: Content | None, param: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        # Gemini rejects empty text parts outright.
        return [{"text": content}] if content else []
    parts: list[JSON] = []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        if isinstance(part, TextPart) and part.text:
            parts.append({"text": part.text})
        elif isinstance(part, RefusalPart) and part.refusal:
            parts.append({"text": part.refusal})
        elif isinstance(part, ImagePart):
            parts.append(_media_part(part.image_url.url, f"{where}.image_url.url"))
        elif isinstance(part, AudioPart):
            mime = f"audio/{part.input_audio.format}"
            parts.append({"inlineData": {"mimeType": mime, "data": part.input_audio.data}})
        elif isinstance(part, FilePart):
            data = part.file.get("file_data")
            if not isinstance(data, str) or not data.startswith("data:"):
                raise InvalidRequestError(
                    "gemini deployments take files as file_data URLs, not file ids",
                    param=f"{where}.file",
                )
            parts.append(_media_part(data, f"{where}.file.file_data"))
    return parts


_MIME_BY_EXTENSION = {
    **dict.fromkeys((".jpg", ".jpeg"), "image/jpeg"),
    **{f".{ext}": f"image/{ext}" for ext in ("png", "gif", "webp", "heic", "heif")},
    ".pdf": "application/pdf",
    ".mp3": "audio/mp3",
    ".wav": "audio/wav",
}


def _media_part(url: str, param: str) -> JSON:
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise InvalidRequestError("malformed data: URL", param=param)
        mime = header.split(";", 1)[0] or "image/jpeg"
        if not header.endswith(";base64"):
            # inlineData is always base64; percent-encoded data URLs are re-encoded.
            payload = base64.b64encode(urllib.parse.unquote_to_bytes(payload)).decode()
        return {"inlineData": {"mimeType": mime, "data": payload}}
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise InvalidRequestError("media URLs must be http(s) or data: URLs", param=param)
    # A fixed table rather than `mimetypes`, whose answers depend on the host's files.
    ext = parsed.path[parsed.path.rfind(".") :].lower() if "." in parsed.path else ""
    mime = _MIME_BY_EXTENSION.get(ext, "image/jpeg")
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _call_args(arguments: str, param: str) -> JSON:
    if not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(
            "tool call arguments are not valid JSON",
            param=f"{param}.function.arguments",
            code="invalid_value",
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(
            "tool call arguments must be a JSON object",
            param=f"{param}.function.arguments",
            code="invalid_value",
        )
    return parsed


def _function_response(name: str, content: Content | None) -> JSON:
    text = text_of(content)
    try:
        parsed: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    value = parsed if isinstance(parsed, dict) else text
    return {"functionResponse": {"name": name, "response": {"content": value}}}


# JSON-Schema keywords outside the OpenAPI subset Gemini accepts; each fails the request.
_REJECTED_SCHEMA_KEYS = frozenset(
    {
        "additionalProperties",
        "unevaluatedProperties",
        "patternProperties",
        "dependentRequired",
        "dependentSchemas",
        "$schema",
        "$id",
        "$comment",
        "strict",
        "examples",
    }
)
_SUBSCHEMA_KEYS = frozenset({"items", "anyOf", "oneOf", "allOf", "not", "prefixItems"})
_NAMED_SUBSCHEMA_KEYS = frozenset({"properties", "$defs", "definitions"})


def clean_schema(schema: Any) -> Any:
    """`schema` without the keywords Gemini rejects, recursively.

    Only schema positions are walked, so a property *named* like a keyword (`strict`)
    and the values of `enum`, `default` or `example` are left alone.
    """
    if isinstance(schema, list):
        return [clean_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: JSON = {}
    for key, value in schema.items():
        if key in _REJECTED_SCHEMA_KEYS:
            continue
        if key in _NAMED_SUBSCHEMA_KEYS and isinstance(value, dict):
            out[key] = {name: clean_schema(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_KEYS:
            out[key] = clean_schema(value)
        elif key == "type" and isinstance(value, list):
            # OpenAPI 3.0 spells ["string", "null"] as type "string" + nullable.
            kinds = [k for k in value if k != "null"]
            out["type"] = kinds[0] if len(kinds) == 1 else kinds
            if "null" in value:
                out["nullable"] = True
        else:
            out[key] = value
    return out


def _declaration(tool: Tool) -> JSON:
    fn = tool.function
    out: JSON = {"name": fn.name}
    if fn.description:
        out["description"] = fn.description
    params = clean_schema(fn.parameters) if fn.parameters else None
    # Gemini rejects an OBJECT schema with empty `properties`; no parameters means the same.
    if params and (params.get("properties") or params.get("type") != "object"):
        out["parameters"] = params
    return out


_CALLING_MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}


def _tool_config(choice: ToolChoice | None) -> JSON | None:
    if choice is None:
        return None
    if isinstance(choice, NamedToolChoice):
        name = choice.function.get("name")
        if not name:
            raise InvalidRequestError("tool_choice.function.name is required", param="tool_choice")
        config: JSON = {"mode": "ANY", "allowedFunctionNames": [name]}
    else:
        config = {"mode": _CALLING_MODES[choice]}
    return {"functionCallingConfig": config}


def _generation_config(request: ChatCompletionRequest) -> JSON:
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    config: JSON = {
        "temperature": request.temperature,
        "topP": request.top_p,
        "maxOutputTokens": request.output_limit,
        "stopSequences": stop or None,
        "seed": request.seed,
        "candidateCount": request.n,
        "presencePenalty": request.presence_penalty,
        "frequencyPenalty": request.frequency_penalty,
    }
    fmt = request.response_format
    if isinstance(fmt, ResponseFormatJSONObject | ResponseFormatJSONSchema):
        config["responseMimeType"] = "application/json"
    if isinstance(fmt, ResponseFormatJSONSchema) and fmt.json_schema.schema_:
        config["responseSchema"] = clean_schema(fmt.json_schema.schema_)
    return {key: value for key, value in config.items() if value is not None}


# ---------------------------------------------------------------- response

_FILTERED = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)


def finish_reason(raw: str, has_calls: bool) -> str:
    if raw == "STOP":
        return "tool_calls" if has_calls else "stop"
    if raw == "MAX_TOKENS":
        return "length"
    return "content_filter" if raw in _FILTERED else "stop"


def read_parts(candidate: JSON) -> tuple[str, list[JSON]]:
    """The answer text and the functionCall objects of a candidate; thoughts left out."""
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    texts: list[str] = []
    calls: list[JSON] = []
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        if isinstance(part.get("functionCall"), dict):
            calls.append(part["functionCall"])
    return "".join(texts), calls


def tool_call(index: int, call: JSON) -> JSON:
    return {
        "id": f"call_{index}_{secrets.token_hex(8)}",
        "type": "function",
        "function": {
            "name": str(call.get("name", "")),
            # proto3 JSON omits an empty `args`.
            "arguments": orjson.dumps(call.get("args") or {}).decode(),
        },
    }


def read_usage(meta: Any) -> JSON | None:
    if not isinstance(meta, dict):
        return None
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    out = usage(
        int(meta.get("promptTokenCount") or 0),
        int(meta.get("candidatesTokenCount") or 0) + thoughts,
    )
    if thoughts:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    if cached := int(meta.get("cachedContentTokenCount") or 0):
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def blocked(resp: JSON) -> bool:
    """Whether Gemini refused the prompt itself (it then sends no candidates)."""
    feedback = resp.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def _choice(candidate: JSON) -> tuple[JSON, str]:
    text, calls = read_parts(candidate)
    message: JSON = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [tool_call(i, c) for i, c in enumerate(calls)]
    raw = candidate.get("finishReason")
    return message, finish_reason(raw if isinstance(raw, str) else "STOP", bool(calls))


def to_completion(resp: JSON, model: str) -> JSON:
    """A `chat.completion` for a `GenerateContentResponse`, one choice per candidate."""
    candidates = [c for c in resp.get("candidates") or [] if isinstance(c, dict)]
    version = resp.get("modelVersion") or model
    if not candidates:
        if not blocked(resp):
            raise UpstreamError("upstream answered without candidates")
        return completion(
            model=version,
            message={"role": "assistant", "content": ""},
            finish_reason="content_filter",
            usage=read_usage(resp.get("usageMetadata")),
        )
    message, finish = _choice(candidates[0])
    out = completion(
        model=version,
        message=message,
        finish_reason=finish,
        usage=read_usage(resp.get("usageMetadata")),
    )
    for position, candidate in enumerate(candidates[1:], start=1):
        message, finish = _choice(candidate)
        out["choices"].append(
            {
                "index": candidate.get("index", position),
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
        )
    return out
