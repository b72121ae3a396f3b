"""What the quality rules need from a streamed answer, gathered as its chunks pass.

Not the answer itself (that is `StreamAssembler`'s job, and only when content is kept):
per choice, the head of the text (refusals open an answer) or all of it when the request
asked for JSON, each tool call's name and arguments by `index`, any refusal, and the
finish reason. `answer()` shapes them as a `chat.completion` for `score_answer`.
"""

from __future__ import annotations

from typing import Any

from app.cycle.rules import HEAD_CHARS

JSON = dict[str, Any]


class _Call:
    __slots__ = ("args", "name")

    def __init__(self) -> None:
        self.name: str | None = None
        self.args: list[str] = []  # joined once, at the end


class _Choice:
    __slots__ = ("calls", "finish", "kept", "refusal", "text", "visible")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.kept = 0  # characters in `text`
        self.visible = False  # any non-blank text seen (kept or not)
        self.refusal = False
        self.calls: dict[int, _Call] = {}
        self.finish: str | None = None


class AnswerGatherer:
    __slots__ = ("_choices", "_limit", "chars")

    def __init__(self, whole_text: bool) -> None:
        # JSON answers are parsed and checked whole; any other needs only its head.
        self._limit = None if whole_text else HEAD_CHARS
        self._choices: dict[int, _Choice] = {}
        # Characters of text and tool arguments seen: the record's estimate of the
        # answer's tokens when the upstream sends no usage.
        self.chars = 0

    def feed(self, index: Any, delta: JSON, finish: str | None) -> None:
        """One choice of one chunk (its `index`, `delta` and `finish_reason`)."""
        index = index if type(index) is int else 0  # sorted at the end: ints only
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _Choice()
        content = delta.get("content")
        if content and isinstance(content, str):
            self.chars += len(content)
            # The first text after a blank head is kept too: else the answer looks empty.
            first = not state.visible and not content.isspace()
            if self._limit is None or state.kept < self._limit or first:
                state.text.append(content)
                state.kept += len(content)
            if first:
                state.visible = True
        if delta.get("refusal"):
            state.refusal = True
        calls = delta.get("tool_calls")
        if calls:
            for call in calls:
                self.chars += _feed_call(state, call.get("index", 0), call.get("function"))
        legacy = delta.get("function_call")
        if legacy:
            self.chars += _feed_call(state, -1, legacy)  # the deprecated `functions` API
        if finish:
            state.finish = finish

    def answer(self) -> JSON:
        return {"choices": [_choice(self._choices[i]) for i in sorted(self._choices)]}


def _feed_call(state: _Choice, index: Any, function: Any) -> int:
    """Note a piece of a tool call; the characters of arguments it carried."""
    index = index if type(index) is int else 0
    call = state.calls.get(index)
    if call is None:
        call = state.calls[index] = _Call()
    if not isinstance(function, dict):
        return 0
    name = function.get("name")
    if name:
        call.name = name
    arguments = function.get("arguments")
    if arguments and isinstance(arguments, str):
        call.args.append(arguments)
        return len(arguments)
    return 0


def _choice(state: _Choice) -> JSON:
    message: JSON = {"content": "".join(state.text) if state.visible else ""}
    if state.refusal:
        message["refusal"] = True
    if state.calls:
        message["tool_calls"] = [
            {"function": {"name": c.name, "arguments": "".join(c.args)}}
            for _, c in sorted(state.calls.items())
        ]
    return {"message": message, "finish_reason": state.finish}
