"""Stored pairs into OpenAI chat fine-tuning examples: what is kept, renamed, or refused."""

from __future__ import annotations

from typing import Any

import pytest

from app.cycle.finetune import example

USER = {"role": "user", "content": "Hi"}


def answer(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def test_a_whole_conversation_keeps_each_roles_own_fields() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = {
        "model": "m",
        "temperature": 0.1,
        "messages": [
            {"role": "developer", "content": "Rules.", "name": "ops"},
            {"role": "user", "content": "Use f", "cache_control": {"type": "ephemeral"}},
            {"role": "assistant", "content": None, "tool_calls": [call], "audio": None},
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "ignored"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "custom"}],
    }
    out = example(request, answer({"role": "assistant", "content": "It is 42.", "audio": None}))
    assert out == {
        "messages": [
            {"role": "system", "content": "Rules.", "name": "ops"},
            {"role": "user", "content": "Use f"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is 42."},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }


def test_legacy_functions_and_function_call() -> None:
    request = {"messages": [USER], "functions": [{"name": "g", "parameters": {}}]}
    fc = {"name": "g", "arguments": "{}"}
    out = example(request, answer({"role": "assistant", "content": None, "function_call": fc}))
    assert out is not None
    assert out["functions"] == request["functions"]
    assert out["messages"][-1] == {"role": "assistant", "function_call": fc}
    other = {"name": "h", "arguments": "{}"}
    bad = answer({"role": "assistant", "content": None, "function_call": other})
    assert example(request, bad) is None


@pytest.mark.parametrize(
    ("request_", "response"),
    [
        ({"messages": []}, answer({"role": "assistant", "content": "x"})),
        ({"messages": [USER]}, answer({"role": "assistant", "content": ""})),
        ({"messages": [USER]}, answer({"role": "assistant", "content": "x"}, "length")),
        ({"messages": [USER]}, answer({"role": "assistant", "content": "x"}, "content_filter")),
        ({"messages": [USER]}, {"choices": []}),
        ({"messages": [USER]}, "not an object"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            answer({"role": "assistant", "content": "x"}),
        ),
        (
            {"messages": [{"role": "wizard", "content": "x"}]},
            answer({"role": "assistant", "content": "x"}),
        ),
        ({"messages": [{"role": "user"}]}, answer({"role": "assistant", "content": "x"})),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
            answer({"role": "assistant", "content": "x"}),
        ),
        (
            {"messages": [USER]},
            answer({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}),
        ),
    ],
)
def test_pairs_that_cannot_be_examples(request_: Any, response: Any) -> None:
    assert example(request_, response) is None


def test_images_stay_and_parallel_tool_calls_only_with_tools() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    request = {"messages": [{"role": "user", "content": [image]}], "parallel_tool_calls": True}
    out = example(request, answer({"role": "assistant", "content": "A cat."}))
    assert out == {
        "messages": [
            {"role": "user", "content": [image]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
