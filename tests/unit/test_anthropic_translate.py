"""OpenAI chat shapes ↔ Anthropic Messages API, without a network."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.errors import InvalidRequestError, UpstreamError
from app.providers.anthropic import StreamTranslator
from app.providers.anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    anthropic_error_reader,
    finish_reason,
    from_anthropic,
    to_anthropic,
)
from app.schemas.chat import ChatCompletionRequest

PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
    "awAAAABJRU5ErkJggg=="
)
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def body_for(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **extra})
    return to_anthropic(request, "claude-test", stream=False)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any, *calls: tuple[str, str, str]) -> dict[str, Any]:
    """An OpenAI assistant message with (id, name, arguments) tool calls."""
    tool_calls = [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
    ]
    return {
        "role": "assistant",
        "content": content,
        **({"tool_calls": tool_calls} if calls else {}),
    }


def tool(call_id: str, content: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def use(block_id: str, name: str, args: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": block_id, "name": name, "input": args}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


# ------------------------------------------------------------------------- requests


def test_minimal_request_gets_required_fields() -> None:
    body = body_for([user("hi")])
    assert body == {
        "model": "claude-test",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


def test_system_and_developer_messages_become_top_level_system() -> None:
    developer = {"role": "developer", "content": [text("Answer in French.")]}
    body = body_for([{"role": "system", "content": "Be brief."}, user("hi"), developer])
    assert body["system"] == "Be brief.\n\nAnswer in French."
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_text_and_image_parts() -> None:
    parts = [text("What is in these?"), image(f"data:image/png;base64,{PNG}")]
    parts.append(image("https://example.com/cat.jpg"))
    assert body_for([user(parts)])["messages"][0]["content"] == [
        text("What is in these?"),
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_inline_pdf_becomes_document_block() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    block = body_for([user([part])])["messages"][0]["content"][0]
    assert block == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
    }


@pytest.mark.parametrize(
    ("part", "param"),
    [
        (image("data:image/png,notbase64"), "image_url.url"),
        (image("ftp://example.com/a.png"), "image_url.url"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "type"),
        ({"type": "file", "file": {"file_id": "file-123"}}, "file"),
    ],
)
def test_parts_anthropic_cannot_take_are_refused_with_param(part: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        body_for([user([text("look:"), part])])
    assert caught.value.param == f"messages[0].content[1].{param}"
    assert caught.value.status == 400


def test_tool_round_trip_translation() -> None:
    weather = ("call_a", "get_weather", '{"city": "Paris"}')
    clock = ("call_b", "get_time", "")
    body = body_for(
        [
            user("Weather and time in Paris?"),
            assistant("Checking.", weather, clock),
            tool("call_a", "18C"),
            tool("call_b", [text("14:00")]),
            user("Thanks, summarise."),
        ],
        tools=[WEATHER, TIME],
    )
    assert body["messages"] == [
        {"role": "user", "content": [text("Weather and time in Paris?")]},
        {
            "role": "assistant",
            "content": [
                text("Checking."),
                use("call_a", "get_weather", {"city": "Paris"}),
                use("call_b", "get_time", {}),  # "" arguments become an empty object
            ],
        },
        # Both tool results and the user's follow-up share one user turn, results first.
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_b", "content": [text("14:00")]},
                text("Thanks, summarise."),
            ],
        },
    ]


def test_tool_results_come_before_text_in_a_merged_user_turn() -> None:
    body = body_for(
        [user("hi"), assistant(None, ("c1", "get_time", "{}")), user("also"), tool("c1", "noon")],
        tools=[TIME],
    )
    assert [b["type"] for b in body["messages"][2]["content"]] == ["tool_result", "text"]


def test_assistant_with_only_tool_calls_has_no_empty_text_block() -> None:
    body = body_for(
        [user("hi"), assistant("", ("c1", "get_time", "{}")), tool("c1", "noon")], tools=[TIME]
    )
    assert body["messages"][1]["content"] == [use("c1", "get_time", {})]


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_tool_arguments_are_refused_with_param(arguments: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        body_for([user("hi"), assistant(None, ("c1", "get_time", arguments))])
    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


def test_consecutive_same_role_messages_are_merged() -> None:
    body = body_for(
        [user("one"), user([text("two")]), assistant("three"), assistant("four"), user("five")]
    )
    assert body["messages"] == [
        {"role": "user", "content": [text("one"), text("two")]},
        {"role": "assistant", "content": [text("three"), text("four")]},
        {"role": "user", "content": [text("five")]},
    ]


def test_legacy_function_message_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        body_for([user("hi"), {"role": "function", "name": "f", "content": "x"}])
    assert caught.value.param == "messages[1].role"


def test_tools_translation_with_default_schema() -> None:
    body = body_for([user("hi")], tools=[WEATHER, TIME])
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER["function"]["parameters"],
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body  # Anthropic's default is auto already


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            None,
            {"type": "tool", "name": "get_time"},
        ),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: Any) -> None:
    extra: dict[str, Any] = {"tools": [WEATHER, TIME]}
    if choice is not None:
        extra["tool_choice"] = choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    assert body_for([user("hi")], **extra)["tool_choice"] == expected


def test_named_tool_choice_without_name_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        body_for([user("hi")], tools=[TIME], tool_choice={"type": "function", "function": {}})
    assert caught.value.param == "tool_choice.function.name"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, DEFAULT_MAX_TOKENS),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
    ],
)
def test_max_tokens_is_always_sent(extra: dict[str, Any], expected: int) -> None:
    assert body_for([user("hi")], **extra)["max_tokens"] == expected


def test_sampling_stop_and_user_parameters() -> None:
    body = body_for([user("hi")], temperature=1.7, top_p=0.9, stop="END", user="u-42", seed=7)
    assert body["temperature"] == 1.0  # clamped to Anthropic's range
    assert body["top_p"] == 0.9
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-42"}
    assert "seed" not in body
    assert body_for([user("hi")], temperature=0.3, stop=["a", "b"])["temperature"] == 0.3
    assert body_for([user("hi")], stop=["a", "b"])["stop_sequences"] == ["a", "b"]


def test_json_object_format_becomes_a_system_instruction() -> None:
    body = body_for(
        [{"role": "system", "content": "You are terse."}, user("hi")],
        response_format={"type": "json_object"},
    )
    first, instruction = body["system"].split("\n\n")
    assert first == "You are terse."
    assert "only a valid JSON object" in instruction


def test_json_schema_format_puts_the_schema_in_the_system_prompt() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = body_for(
        [user("hi")],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    assert "'place'" in body["system"]
    assert orjson.dumps(schema).decode() in body["system"]


def test_more_than_one_choice_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        body_for([user("hi")], n=2)
    assert caught.value.param == "n"


# ------------------------------------------------------------------------ responses


def message(content: list[dict[str, Any]], stop: str | None = "end_turn", **usage: int) -> Any:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-s",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 4, **usage},
    }


def test_text_response_translation() -> None:
    out = from_anthropic(message([text("Hello"), text(" world")]), "m")
    assert out["object"] == "chat.completion"
    assert out["model"] == "claude-s"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello world", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def test_tool_use_response_translation() -> None:
    blocks = [
        text("Let me check."),
        use("toolu_1", "get_weather", {"city": "Oslo"}),
        use("toolu_2", "get_time", {}),
    ]
    out = from_anthropic(message(blocks, stop="tool_use"), "m")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_1", "function", "get_weather"),
        ("toolu_2", "function", "get_time"),
    ]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert orjson.loads(calls[1]["function"]["arguments"]) == {}


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_stop_reason_mapping(stop: str, expected: str) -> None:
    assert finish_reason(stop) == expected
    out = from_anthropic(message([text("x")], stop=stop), "m")
    assert out["choices"][0]["finish_reason"] == expected


def test_cached_input_counts_as_prompt_tokens() -> None:
    out = from_anthropic(
        message([], cache_read_input_tokens=100, cache_creation_input_tokens=20), "m"
    )
    assert out["usage"]["prompt_tokens"] == 130
    assert out["usage"]["total_tokens"] == 134
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}
    assert out["choices"][0]["message"]["content"] is None


def test_error_reader_and_unexpected_shapes() -> None:
    with pytest.raises(UpstreamError):
        from_anthropic({"hello": "world"}, "m")
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert anthropic_error_reader(body) == ("slow down", "rate_limit_error", None)
    assert anthropic_error_reader({"unexpected": 1}) == (None, None, None)
    assert anthropic_error_reader("text") == (None, None, None)


# ------------------------------------------------------------------------- streaming


def feed_all(events: list[dict[str, Any]], secret: str = "") -> tuple[StreamTranslator, list[Any]]:
    translator = StreamTranslator("deployment-model", secret)
    out: list[Any] = []
    for event in events:
        out += translator.feed(event)
    return translator, out


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def delta(index: int, **d: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": d}


STREAM_START = {"type": "message_start", "message": message([], None, cache_read_input_tokens=3)}
STREAM_START["message"]["usage"].update(input_tokens=12, output_tokens=1)


def test_stream_translation_text_then_two_tools() -> None:
    translator, chunks = feed_all(
        [
            STREAM_START,
            block_start(0, text("")),
            {"type": "ping"},
            delta(0, type="text_delta", text="Let me "),
            delta(0, type="text_delta", text="check."),
            {"type": "content_block_stop", "index": 0},
            block_start(1, use("toolu_a", "get_weather", {})),
            delta(1, type="input_json_delta", partial_json=""),
            delta(1, type="input_json_delta", partial_json='{"city":'),
            delta(1, type="input_json_delta", partial_json=' "Oslo"}'),
            {"type": "content_block_stop", "index": 1},
            block_start(2, use("toolu_b", "get_time", {})),
            delta(2, type="input_json_delta", partial_json="{}"),
            {"type": "content_block_stop", "index": 2},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 40},
            },
            {"type": "message_stop"},
        ]
    )
    assert translator.finished
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "claude-s" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    starts = [d["tool_calls"][0] for d in deltas if "id" in d.get("tool_calls", [{}])[0]]
    # Anthropic's blocks 1 and 2 are OpenAI's tool calls 0 and 1.
    assert [(c["index"], c["id"], c["type"], c["function"]) for c in starts] == [
        (0, "toolu_a", "function", {"name": "get_weather", "arguments": ""}),
        (1, "toolu_b", "function", {"name": "get_time", "arguments": ""}),
    ]
    args: dict[int, str] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
    assert {i: orjson.loads(a) for i, a in args.items()} == {0: {"city": "Oslo"}, 1: {}}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 40,
        "total_tokens": 55,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


def test_stream_message_delta_may_restate_input_tokens() -> None:
    _, chunks = feed_all(
        [
            STREAM_START,
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens"},
                "usage": {"input_tokens": 20, "output_tokens": 7},
            },
            {"type": "message_stop"},
        ]
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["prompt_tokens"] == 20
    assert chunks[-1]["usage"]["completion_tokens"] == 7


def test_stream_error_event_is_sanitised() -> None:
    secret = "anthropic-secret-value-123"
    event = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": f"Overloaded for {secret}"},
    }
    with pytest.raises(UpstreamError) as caught:
        feed_all([STREAM_START, event], secret=secret)
    assert "Overloaded" in caught.value.message
    assert secret not in caught.value.message


def test_stream_tool_input_for_unknown_block_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        feed_all([STREAM_START, delta(3, type="input_json_delta", partial_json="{}")])


def test_stream_ignores_thinking_and_unknown_events() -> None:
    translator, chunks = feed_all(
        [
            STREAM_START,
            block_start(0, {"type": "thinking", "thinking": ""}),
            delta(0, type="thinking_delta", thinking="hmm"),
            delta(0, type="signature_delta", signature="abc"),
            {"type": "some_future_event"},
        ]
    )
    assert not translator.finished
    assert len(chunks) == 1  # only the role chunk
