"""A stored request and its answer as one training example in OpenAI's chat fine-tuning
format (one JSONL line each):

    {"messages": [...the request's messages..., {"role": "assistant", ...answer...}],
     "tools": [...], "parallel_tool_calls": false}

Only what the format accepts is kept: the roles system, user, assistant, tool and
function (a `developer` message is the newer name of a system one and becomes one),
each with its own fields; text and image content parts; function tools; the legacy
`functions`. Anything the format would refuse or that would teach the wrong thing makes
the pair no example at all (None): an answer cut short, filtered or refused, an empty
one, a call of a tool the request did not offer, content parts a fine-tuning file cannot
hold (audio, files). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]

# The fields each role's message keeps in a training file.
_FIELDS: Mapping[str, tuple[str, ...]] = {
    "system": ("content", "name"),
    "user": ("content", "name"),
    "assistant": ("content", "name", "tool_calls", "function_call", "weight"),
    "tool": ("content", "tool_call_id"),
    "function": ("content", "name"),
}
_PARTS = frozenset({"text", "image_url"})
# Answers that ended as the model meant them to; "length" and "content_filter" did not.
_FINISHED = frozenset({"stop", "tool_calls", "function_call"})


class NotAnExample(ValueError):
    """The pair cannot become a valid training example."""


def example(request: Any, response: Any) -> JSON | None:
    """The training example of a stored request and answer, or None."""
    try:
        return _example(request, response)
    except NotAnExample:
        return None


def _example(request: Any, response: Any) -> JSON:
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise NotAnExample("bodies are not objects")
    raw = request.get("messages")
    if not isinstance(raw, list) or not raw:
        raise NotAnExample("no messages")
    out: JSON = {"messages": [_message(m) for m in raw]}
    tools = _tools(request.get("tools"))
    if tools:
        out["tools"] = tools
    functions = request.get("functions")
    if isinstance(functions, list) and functions:
        out["functions"] = functions
    if isinstance(request.get("parallel_tool_calls"), bool) and tools:
        out["parallel_tool_calls"] = request["parallel_tool_calls"]
    answer = _answer(response)
    _check_calls(answer, tools, functions if isinstance(functions, list) else None)
    out["messages"].append(answer)
    return out


def _message(raw: Any) -> JSON:
    if not isinstance(raw, dict):
        raise NotAnExample("a message is not an object")
    role = "system" if raw.get("role") == "developer" else raw.get("role")
    fields = _FIELDS.get(role) if isinstance(role, str) else None
    if fields is None:
        raise NotAnExample(f"role {role!r} has no place in a training file")
    msg: JSON = {"role": role}
    for name in fields:
        if raw.get(name) is not None:
            msg[name] = raw[name]
    if "content" in msg:
        msg["content"] = _content(msg["content"])
    if "tool_calls" in msg:
        msg["tool_calls"] = _tool_calls(msg["tool_calls"])
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise NotAnExample("a tool message without its tool_call_id")
    if role == "function" and not isinstance(msg.get("name"), str):
        raise NotAnExample("a function message without its name")
    if role == "assistant" and not ({"content", "tool_calls", "function_call"} & msg.keys()):
        raise NotAnExample("an assistant message with neither content nor calls")
    if role in ("system", "user", "tool") and "content" not in msg:
        raise NotAnExample(f"a {role} message without content")
    return msg


def _content(content: Any) -> str | list[JSON]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise NotAnExample("content is neither text nor parts")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _PARTS:
            raise NotAnExample("a content part a training file cannot hold")
    return content


def _tool_calls(calls: Any) -> list[JSON]:
    """The calls as the format spells them: id, type, function {name, arguments} (a
    streamed answer's assembled calls may still carry their `index`)."""
    if not isinstance(calls, list) or not calls:
        raise NotAnExample("tool_calls is not a list of calls")
    out: list[JSON] = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise NotAnExample("a tool call without a function name")
        args = fn.get("arguments")
        if not isinstance(args, str) or not isinstance(call.get("id"), str):
            raise NotAnExample("a tool call without an id or string arguments")
        out.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out


def _tools(tools: Any) -> list[JSON]:
    """The function tools (other kinds are not in the format: a call of one is refused
    by `_check_calls`, since its name is not offered)."""
    if not isinstance(tools, list):
        return []
    out: list[JSON] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        fn = tool.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append({"type": "function", "function": fn})
    return out


def _answer(response: JSON) -> JSON:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise NotAnExample("an answer without choices")
    choice = choices[0]
    if choice.get("finish_reason") not in _FINISHED:
        raise NotAnExample(f"an answer that ended with {choice.get('finish_reason')!r}")
    message = choice.get("message")
    if not isinstance(message, dict) or message.get("refusal"):
        raise NotAnExample("a refusal, or no message")
    answer = _message({**message, "role": "assistant", "weight": None})
    if answer.get("content") == "" and not ({"tool_calls", "function_call"} & answer.keys()):
        raise NotAnExample("an empty answer")
    if answer.get("content") == "" or answer.get("content") is None:
        answer.pop("content", None)  # a call-only answer: the format omits content
    return answer


def _check_calls(answer: JSON, tools: list[JSON], functions: list[Any] | None) -> None:
    offered = {t["function"]["name"] for t in tools}
    for call in answer.get("tool_calls") or ():
        if call["function"]["name"] not in offered:
            raise NotAnExample(f"a call of {call['function']['name']!r}, not an offered tool")
    legacy = answer.get("function_call")
    if legacy is not None:
        names = {f.get("name") for f in functions or () if isinstance(f, dict)}
        if not isinstance(legacy, dict) or legacy.get("name") not in names:
            raise NotAnExample("a function_call of a function the request did not offer")
