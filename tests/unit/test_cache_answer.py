"""Streamed answers folded into one cacheable completion and replayed as chunks, no network."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from app.cache.answer import StreamAssembler, is_cacheable, replay_chunks, split_text

CREATED = 1_732_000_000
MODEL = "gpt-4o-mini-2024-07-18"
FP = "fp_0ba0d124f1"
USAGE: dict[str, Any] = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}


def chunk(
    delta: dict[str, Any] | None,
    finish: str | None = None,
    *,
    index: int = 0,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One chunk as OpenAI streams it with stream_options.include_usage."""
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": FP,
        "choices": []
        if delta is None
        else [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any] | None:
    asm = StreamAssembler()
    for c in chunks:
        asm.feed(c)
    return asm.result()


def answer(*choices: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "req-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": list(choices),
        "system_fingerprint": FP,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def choice(message: dict[str, Any], finish: str | None = "stop", index: int = 0) -> dict[str, Any]:
    full = {"role": "assistant", "content": None, "refusal": None, **message}
    return {"index": index, "message": full, "logprobs": None, "finish_reason": finish}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


TEXT_STREAM = [
    chunk({"role": "assistant", "content": "", "refusal": None}),
    chunk({"content": "Hello"}),
    chunk({"content": ","}),
    chunk({"content": " world"}),
    chunk({"content": "!"}),
    chunk({}, "stop"),
    chunk(None, usage=USAGE),
]

TOOL_STREAM = [
    chunk({"role": "assistant", "content": None, "refusal": None}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]}),
    chunk({}, "tool_calls"),
    chunk(None, usage=USAGE),
]


def test_assembles_a_text_stream() -> None:
    got = assemble(TEXT_STREAM)
    assert got == {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "system_fingerprint": FP,
    }
    ChatCompletion.model_validate(got)


def test_assembles_parallel_tool_calls_interleaved_by_index() -> None:
    # The second call's deltas arrive before the first call's last one.
    got = assemble(TOOL_STREAM)
    assert got is not None
    message = got["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        tool_call("call_a", "get_weather", '{"city": "Paris"}'),
        tool_call("call_b", "get_time", '{"tz": "CET"}'),
    ]
    assert got["choices"][0]["finish_reason"] == "tool_calls"
    ChatCompletion.model_validate(got)


def test_tool_calls_are_ordered_by_index_not_arrival() -> None:
    calls = [
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "b"}},
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "a"}},
    ]
    got = assemble([chunk({"role": "assistant", "tool_calls": calls}), chunk({}, "tool_calls")])
    assert got is not None
    assert [c["id"] for c in got["choices"][0]["message"]["tool_calls"]] == ["call_a", "call_b"]


def test_incomplete_streams_give_none() -> None:
    assert assemble([]) is None
    assert assemble(TEXT_STREAM[:5]) is None
    assert assemble([chunk(None, usage=USAGE)]) is None
    # One choice of two finished is not an answer either.
    two = [chunk({"content": "a"}, "stop"), chunk({"content": "b"}, index=1)]
    assert assemble(two) is None
    # A tool call that never got its id cannot be replayed faithfully.
    nameless = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, "stop")]
    assert assemble(nameless) is None


def test_empty_answer_has_empty_content() -> None:
    got = assemble([chunk({"role": "assistant", "content": ""}), chunk({}, "stop")])
    assert got is not None
    assert got["choices"][0]["message"] == {"role": "assistant", "content": "", "refusal": None}
    assert "usage" not in got


def test_first_fingerprint_and_last_usage_win() -> None:
    later = {**chunk(None, usage=USAGE), "system_fingerprint": "fp_other", "model": "other"}
    got = assemble([*TEXT_STREAM[:-1], later])
    assert got is not None
    assert (got["system_fingerprint"], got["model"], got["usage"]) == (FP, MODEL, USAGE)


def test_assembler_does_not_mutate_chunks() -> None:
    chunks = copy.deepcopy(TOOL_STREAM)
    assemble(chunks)
    assert chunks == TOOL_STREAM


LONG = (
    "Größe matters: naïve café 😀 — 日本語のテキスト.\n\n"
    "  Indented line\twith a tab, trailing spaces   \n" + "word " * 40 + "x" * 100 + " end\n"
)

ROUND_TRIPS = {
    "text": answer(choice({"content": LONG}), usage=USAGE),
    "empty": answer(choice({"content": ""})),
    "tools": answer(
        choice(
            {
                "tool_calls": [
                    tool_call("call_a", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
                    tool_call("call_b", "lookup", '{"q": "' + "ü " * 50 + '"}'),
                ]
            },
            "tool_calls",
        ),
        usage=USAGE,
    ),
    "text_and_tools": answer(
        choice(
            {"content": "Let me check.", "tool_calls": [tool_call("c", "f", "{}")]}, "tool_calls"
        )
    ),
    "refusal": answer(choice({"refusal": "I can't help with that. " * 5})),
    "length": answer(choice({"content": "truncated mid-sen"}, "length")),
    "two_choices": answer(
        choice({"content": "first answer " * 10}),
        choice({"content": "second"}, index=1),
        usage=USAGE,
    ),
    "legacy_function_call": answer(
        choice({"function_call": {"name": "f", "arguments": '{"a": 1}'}}, "function_call")
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_replay_then_assemble_round_trips(name: str) -> None:
    original = ROUND_TRIPS[name]
    chunks = replay_chunks(original, request_id="req-1", include_usage=True, piece_chars=16)
    assert assemble(chunks) == original
    ChatCompletion.model_validate(original)


def test_replay_round_trips_an_assembled_stream() -> None:
    first = assemble(TOOL_STREAM)
    assert first is not None
    again = assemble(replay_chunks(first, request_id="chatcmpl-up", include_usage=True))
    assert again == first


def test_replayed_chunks_have_the_wire_shape() -> None:
    original = ROUND_TRIPS["tools"]
    chunks = replay_chunks(original, request_id="req-9", include_usage=True)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert c["id"] == "req-9"
        assert c["object"] == "chat.completion.chunk"
        assert (c["created"], c["model"], c["system_fingerprint"]) == (CREATED, MODEL, FP)
    head = chunks[0]["choices"][0]
    assert head == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert chunks[1]["choices"][0]["delta"] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    finish = chunks[-2]["choices"][0]
    assert (finish["delta"], finish["finish_reason"]) == ({}, "tool_calls")
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_no_usage_chunk_unless_asked() -> None:
    original = ROUND_TRIPS["text"]
    chunks = replay_chunks(original, request_id="req-1", include_usage=False)
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert assemble(chunks) == {k: v for k, v in original.items() if k != "usage"}
    # Asked for, but the answer has none: nothing to send.
    bare = ROUND_TRIPS["empty"]
    assert all(c["choices"] for c in replay_chunks(bare, request_id="r", include_usage=True))


def test_long_content_streams_in_pieces() -> None:
    chunks = replay_chunks(ROUND_TRIPS["text"], request_id="r", include_usage=False)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(pieces) >= len(LONG) // 32
    assert all(p and len(p) <= 32 for p in pieces)
    assert "".join(p for p in pieces if p) == LONG


def test_without_fingerprint_chunks_have_none() -> None:
    original = {k: v for k, v in ROUND_TRIPS["text"].items() if k != "system_fingerprint"}
    chunks = replay_chunks(original, request_id="req-1", include_usage=True)
    assert all("system_fingerprint" not in c for c in chunks)
    assert assemble(chunks) == original


def test_replays_a_non_streaming_upstream_answer() -> None:
    # As OpenAI's JSON API returns it: extra fields the cache need not carry are ignored.
    upstream = answer(choice({"content": "Paris.", "annotations": []}), usage=USAGE)
    upstream["service_tier"] = "default"
    chunks = replay_chunks(upstream, request_id="req-1", include_usage=True)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    got = assemble(chunks)
    assert got is not None
    assert got["choices"][0]["message"]["content"] == "Paris."


@pytest.mark.parametrize("name", ["text", "tools", "text_and_tools", "refusal", "two_choices"])
def test_the_sdk_reassembles_the_replay(name: str) -> None:
    original = ROUND_TRIPS[name]
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for c in replay_chunks(original, request_id="req-1", include_usage=True, piece_chars=8):
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    final = state.get_final_completion()
    if "usage" in original:
        assert final.usage is not None
        assert final.usage.model_dump(exclude_none=True) == USAGE
    else:
        assert final.usage is None
    for got, want in zip(final.choices, original["choices"], strict=True):
        assert got.finish_reason == want["finish_reason"]
        assert got.message.refusal == want["message"]["refusal"]
        # The SDK keeps the "" of the role delta where the API would say null.
        assert (got.message.content or None) == want["message"]["content"]
        calls = [
            c.model_dump(include={"id", "type", "function"}) for c in got.message.tool_calls or []
        ]
        for call in calls:
            call["function"].pop("parsed_arguments", None)
        assert calls == want["message"].get("tool_calls", [])


def test_split_text_prefers_whitespace_and_keeps_every_character() -> None:
    assert split_text("", 4) == []
    assert split_text("abc", 4) == ["abc"]
    assert split_text("aaaa bbbb cccc", 6) == ["aaaa ", "bbbb ", "cccc"]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert split_text("a\nbcdefgh", 4) == ["a\nbc", "defg", "h"]
    for size in (1, 2, 3, 7, 32):
        pieces = split_text(LONG, size)
        assert "".join(pieces) == LONG
        assert all(0 < len(p) <= size for p in pieces)
    with pytest.raises(ValueError, match="piece_chars"):
        replay_chunks(ROUND_TRIPS["text"], request_id="r", include_usage=False, piece_chars=0)


@pytest.mark.parametrize(
    ("finish", "allow_length", "expected"),
    [
        ("stop", False, True),
        ("tool_calls", False, True),
        ("function_call", False, True),
        ("length", False, False),
        ("length", True, True),
        ("content_filter", True, False),
        (None, True, False),
        ("error", True, False),
    ],
)
def test_is_cacheable_by_finish_reason(
    finish: str | None, allow_length: bool, expected: bool
) -> None:
    one = answer(
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": finish}
    )
    assert is_cacheable(one, allow_length=allow_length) is expected


def test_is_cacheable_needs_every_choice_complete_with_a_message() -> None:
    good = choice({"content": "ok"})
    assert is_cacheable(answer(good, choice({"content": "ok"}, index=1)), allow_length=False)
    assert not is_cacheable(answer(good, choice({"content": "x"}, None, 1)), allow_length=True)
    assert not is_cacheable(answer(), allow_length=True)
    assert not is_cacheable({"object": "chat.completion"}, allow_length=True)
    no_message = {"index": 0, "finish_reason": "stop"}
    assert not is_cacheable(answer(no_message), allow_length=True)
    assert not is_cacheable({"error": {"message": "boom"}}, allow_length=True)


def test_is_cacheable_embeddings() -> None:
    data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]
    assert is_cacheable({"object": "list", "data": data, "model": "m"}, allow_length=False)
    assert not is_cacheable({"object": "list", "data": [], "model": "m"}, allow_length=False)
    assert not is_cacheable({"object": "list", "data": None}, allow_length=False)
