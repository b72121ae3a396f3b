"""One cacheable answer per chat completion, whether it was streamed or not.

The cache stores a single non-streaming `chat.completion` dict per key, so that one entry
serves both kinds of client: a streamed upstream answer is folded into that shape as it
passes through (`StreamAssembler`, which runs on every chunk and is kept cheap), and a hit
for a streaming client is unfolded back into chunks (`replay_chunks`). Replaying in pieces
rather than as one delta keeps clients that render token by token, or that time out on a
silent stream, behaving as they do against a live upstream. `is_cacheable` decides which
answers are worth keeping: only complete, successful ones.
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]

# Finish reasons of an answer that ended on its own terms; "length" (truncated by
# max_tokens) is a caller's choice because a retry with the same request truncates again.
DONE_REASONS = frozenset({"stop", "tool_calls", "function_call"})


class _ToolCall:
    __slots__ = ("args", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type = "function"
        self.name: str | None = None
        # Pieces joined once in `result()`: repeated `str +=` would copy on every chunk.
        self.args: list[str] = []


class _Choice:
    __slots__ = ("content", "finish_reason", "function_call", "refusal", "role", "tools")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] | None = None
        self.tools: dict[int, _ToolCall] = {}
        # The deprecated `functions` API; still answered by OpenAI and still cacheable.
        self.function_call: _ToolCall | None = None
        self.finish_reason: str | None = None

    def feed(self, delta: JSON) -> None:
        role = delta.get("role")
        if role:
            self.role = role
        content = delta.get("content")
        if content:
            self.content.append(content)
        refusal = delta.get("refusal")
        if refusal is not None:
            if self.refusal is None:
                self.refusal = []
            self.refusal.append(refusal)
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            tool = self.tools.get(index)
            if tool is None:
                tool = self.tools[index] = _ToolCall()
            _feed_call(tool, call)
            _feed_function(tool, call.get("function"))
        function_call = delta.get("function_call")
        if function_call is not None:
            if self.function_call is None:
                self.function_call = _ToolCall()
            _feed_function(self.function_call, function_call)

    def message(self) -> JSON | None:
        """The assembled message, or None when a tool call never got its id or name."""
        tools = [self.tools[i] for i in sorted(self.tools)]
        if any(t.id is None or t.name is None for t in tools):
            return None
        content: str | None = "".join(self.content)
        refusal = "".join(self.refusal) if self.refusal is not None else None
        # OpenAI answers `content: null` beside tool calls or a refusal, never "".
        if not content and (tools or refusal or self.function_call is not None):
            content = None
        msg: JSON = {"role": self.role, "content": content, "refusal": refusal or None}
        if tools:
            msg["tool_calls"] = [
                {
                    "id": t.id,
                    "type": t.type,
                    "function": {"name": t.name, "arguments": "".join(t.args)},
                }
                for t in tools
            ]
        fc = self.function_call
        if fc is not None:
            if fc.name is None:
                return None
            msg["function_call"] = {"name": fc.name, "arguments": "".join(fc.args)}
        return msg


def _feed_call(tool: _ToolCall, call: JSON) -> None:
    call_id = call.get("id")
    if call_id:
        tool.id = call_id
    call_type = call.get("type")
    if call_type:
        tool.type = call_type


def _feed_function(tool: _ToolCall, function: JSON | None) -> None:
    if not function:
        return
    name = function.get("name")
    if name:
        tool.name = name
    arguments = function.get("arguments")
    if arguments:
        tool.args.append(arguments)


class StreamAssembler:
    """Folds `chat.completion.chunk` dicts into the `chat.completion` they add up to.

    Chunks are read, never copied or kept; `usage` is kept by reference.
    """

    __slots__ = ("_choices", "_created", "_fingerprint", "_id", "_model", "_usage")

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self._id: str | None = None
        self._created: int | None = None
        self._model: str | None = None
        self._fingerprint: str | None = None
        self._usage: JSON | None = None

    def feed(self, chunk: JSON) -> None:
        if self._id is None:
            self._id = chunk.get("id")
        if self._created is None:
            self._created = chunk.get("created")
        if self._model is None:
            self._model = chunk.get("model")
        if self._fingerprint is None:
            self._fingerprint = chunk.get("system_fingerprint")
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
            delta = choice.get("delta")
            if delta:
                state.feed(delta)
            finish = choice.get("finish_reason")
            if finish is not None:
                state.finish_reason = finish

    def result(self) -> JSON | None:
        """The whole answer, or None while any choice is unfinished (or none was seen)."""
        if not self._choices:
            return None
        choices: list[JSON] = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message = state.message() if state.finish_reason is not None else None
            if message is None:
                return None
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": state.finish_reason,
                }
            )
        answer: JSON = {
            "id": self._id or "",
            "object": "chat.completion",
            "created": self._created or 0,
            "model": self._model or "",
            "choices": choices,
        }
        if self._usage is not None:
            answer["usage"] = self._usage
        if self._fingerprint is not None:
            answer["system_fingerprint"] = self._fingerprint
        return answer


def replay_chunks(
    answer: JSON, *, request_id: str, include_usage: bool, piece_chars: int = 32
) -> list[JSON]:
    """The `chat.completion.chunk`s that stream `answer` again, a few words per chunk.

    `StreamAssembler` folds them back into `answer` (with `id` set to `request_id`).
    """
    if piece_chars < 1:
        raise ValueError("piece_chars must be at least 1")
    base: JSON = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": answer.get("created", 0),
        "model": answer.get("model", ""),
    }
    fingerprint = answer.get("system_fingerprint")
    if fingerprint is not None:
        base["system_fingerprint"] = fingerprint
    chunks: list[JSON] = []
    for choice in sorted(answer.get("choices") or (), key=lambda c: int(c.get("index", 0))):
        index = choice.get("index", 0)
        for delta, finish in _choice_deltas(choice, piece_chars):
            entry = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunks.append({**base, "choices": [entry]})
    usage = answer.get("usage")
    if include_usage and usage is not None:
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def _choice_deltas(choice: JSON, size: int) -> list[tuple[JSON, str | None]]:
    message = choice.get("message") or {}
    deltas: list[tuple[JSON, str | None]] = [({"role": "assistant", "content": ""}, None)]
    deltas += [({"content": p}, None) for p in split_text(message.get("content") or "", size)]
    deltas += [({"refusal": p}, None) for p in split_text(message.get("refusal") or "", size)]
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        head = {
            "index": i,
            "id": call.get("id"),
            "type": call.get("type", "function"),
            "function": {"name": function.get("name"), "arguments": ""},
        }
        deltas.append(({"tool_calls": [head]}, None))
        for piece in split_text(function.get("arguments") or "", size):
            deltas.append(({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}, None))
    function_call = message.get("function_call")
    if function_call:
        deltas.append(
            ({"function_call": {"name": function_call.get("name"), "arguments": ""}}, None)
        )
        for piece in split_text(function_call.get("arguments") or "", size):
            deltas.append(({"function_call": {"arguments": piece}}, None))
    deltas.append(({}, choice.get("finish_reason")))
    return deltas


def split_text(text: str, size: int) -> list[str]:
    """`text` in pieces of at most `size` characters that join back to it exactly.

    A piece ends just after a space or newline when one falls in its second half, so
    pieces look like the word-ish tokens a live upstream sends.
    """
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > size:
        end = start + size
        floor = start + size // 2
        cut = max(text.rfind(" ", floor, end), text.rfind("\n", floor, end)) + 1
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    if start < n:
        pieces.append(text[start:])
    return pieces


def is_cacheable(answer: JSON, *, allow_length: bool) -> bool:
    """True only for a complete, successful chat answer or a non-empty embeddings list."""
    if answer.get("object") == "list" and "data" in answer:
        data = answer["data"]
        return isinstance(data, list) and bool(data)
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return False
        finish = choice.get("finish_reason")
        if finish not in DONE_REASONS and not (allow_length and finish == "length"):
            return False
    return True
