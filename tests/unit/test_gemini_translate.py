"""Translation between OpenAI chat shapes and Gemini's, with no network."""

from __future__ import annotations

import base64
import re
import struct
from typing import Any

import pytest

from app.errors import InvalidRequestError, UpstreamError
from app.providers.gemini import (
    StreamTranslator,
    gemini_url,
    google_error_reader,
    to_embed_request,
    to_embeddings,
)
from app.providers.gemini_translate import (
    clean_schema,
    finish_reason,
    to_completion,
    to_gemini_request,
)
from app.routing.config import DeploymentConfig
from app.schemas.chat import ChatCompletionRequest

CALL_ID = re.compile(r"^call_\d+_[0-9a-f]{16}$")


def translate(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    body = {"model": "route", "messages": messages, **extra}
    return to_gemini_request(ChatCompletionRequest.model_validate(body))


def weather_tool(name: str = "get_weather", parameters: Any = None) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": parameters
            or {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }


# ---------------------------------------------------------------- messages


def test_system_and_developer_messages_become_the_system_instruction() -> None:
    out = translate(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
        ]
    )
    assert out["systemInstruction"] == {
        "parts": [{"text": "Be brief."}, {"text": "Answer in French."}]
    }
    assert out["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]


def test_a_system_only_prompt_is_sent_as_the_user_turn() -> None:
    out = translate([{"role": "system", "content": "Tell a joke."}])
    assert out["contents"] == [{"role": "user", "parts": [{"text": "Tell a joke."}]}]
    assert "systemInstruction" not in out


def test_user_and_assistant_roles_alternate_and_same_roles_merge() -> None:
    out = translate(
        [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": "four"},
        ]
    )
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "three"}]},
        {"role": "user", "parts": [{"text": "four"}]},
    ]


def test_empty_text_is_left_out_because_gemini_rejects_it() -> None:
    out = translate(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "again"},
        ]
    )
    assert out["contents"] == [{"role": "user", "parts": [{"text": "q"}, {"text": "again"}]}]


def test_images_become_inline_data_or_file_data() -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    out = translate(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "image_url", "image_url": {"url": "https://ex.com/cat.webp?size=2"}},
                    {"type": "image_url", "image_url": {"url": "https://ex.com/picture"}},
                    {"type": "image_url", "image_url": {"url": "data:text/plain,hi%20there"}},
                ],
            },
        ]
    )
    assert out["contents"][0]["parts"] == [
        {"text": "What is this?"},
        {"inlineData": {"mimeType": "image/png", "data": png}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://ex.com/cat.webp?size=2"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://ex.com/picture"}},
        {"inlineData": {"mimeType": "text/plain", "data": base64.b64encode(b"hi there").decode()}},
    ]


@pytest.mark.parametrize("url", ["ftp://ex.com/a.png", "data:image/png;base64"])
def test_unusable_image_urls_are_the_clients_error(url: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        translate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert info.value.param == "messages[0].content[0].image_url.url"


def test_audio_parts_become_inline_data() -> None:
    out = translate(
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                ],
            }
        ]
    )
    assert out["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}}
    ]


def test_tool_round_trip_recovers_function_names_from_call_ids() -> None:
    out = translate(
        [
            {"role": "user", "content": "Weather in Paris and time in Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_b", "content": "14:00"},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 21}'},
        ],
        tools=[weather_tool("get_weather"), weather_tool("get_time")],
    )
    assert out["contents"][1] == {
        "role": "model",
        "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_time", "args": {}}},
        ],
    }
    # Both results in one user turn, each named by its function, JSON objects kept as such.
    assert out["contents"][2] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_time", "response": {"content": "14:00"}}},
            {"functionResponse": {"name": "get_weather", "response": {"content": {"temp_c": 21}}}},
        ],
    }
    assert len(out["contents"]) == 3


def test_legacy_function_messages_become_function_responses() -> None:
    out = translate(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "calling"},
            {"role": "function", "name": "lookup", "content": "[1, 2]"},
        ]
    )
    assert out["contents"][-1] == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "lookup", "response": {"content": "[1, 2]"}}},
        ],
    }


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_unusable_tool_call_arguments_name_the_param(arguments: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        translate(
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": arguments},
                        },
                    ],
                },
            ]
        )
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    assert info.value.status == 400


def test_a_tool_result_for_an_unknown_call_id_is_rejected() -> None:
    with pytest.raises(InvalidRequestError) as info:
        translate(
            [
                {"role": "user", "content": "q"},
                {"role": "tool", "tool_call_id": "call_nowhere", "content": "x"},
            ]
        )
    assert info.value.param == "messages[1].tool_call_id"


# ---------------------------------------------------------------- tools and config


def test_schemas_lose_the_keywords_gemini_rejects_but_keep_property_names() -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "strict": True,
        "properties": {
            "strict": {"type": "boolean"},
            "tags": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"name": {"type": ["string", "null"]}},
                },
            },
            "mode": {"anyOf": [{"type": "string", "$comment": "x"}, {"type": "integer"}]},
            "meta": {"type": "object", "default": {"additionalProperties": 1}},
        },
        "required": ["strict"],
    }
    assert clean_schema(schema) == {
        "type": "object",
        "properties": {
            "strict": {"type": "boolean"},
            "tags": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "nullable": True}},
                },
            },
            "mode": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "meta": {"type": "object", "default": {"additionalProperties": 1}},
        },
        "required": ["strict"],
    }


def test_tools_become_function_declarations() -> None:
    params = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "additionalProperties": False,
    }
    no_params = {
        "type": "function",
        "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
    }
    out = translate(
        [{"role": "user", "content": "q"}], tools=[weather_tool(parameters=params), no_params]
    )
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "get_weather tool",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
                # Gemini refuses OBJECT schemas with no properties, so none is sent.
                {"name": "now"},
            ]
        }
    ]
    assert "toolConfig" not in out


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("none", {"mode": "NONE"}),
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice_becomes_function_calling_config(choice: Any, config: Any) -> None:
    out = translate([{"role": "user", "content": "q"}], tools=[weather_tool()], tool_choice=choice)
    assert out["toolConfig"] == {"functionCallingConfig": config}


def test_generation_config_carries_the_sampling_parameters() -> None:
    out = translate(
        [{"role": "user", "content": "q"}],
        temperature=0.3,
        top_p=0.9,
        max_tokens=50,
        max_completion_tokens=40,
        stop="END",
        seed=7,
        n=2,
        presence_penalty=0.5,
    )
    assert out["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.9,
        "maxOutputTokens": 40,
        "stopSequences": ["END"],
        "seed": 7,
        "candidateCount": 2,
        "presencePenalty": 0.5,
    }
    plain = translate([{"role": "user", "content": "q"}], max_tokens=12, stop=["a", "b"])
    assert plain["generationConfig"] == {"maxOutputTokens": 12, "stopSequences": ["a", "b"]}
    assert "generationConfig" not in translate([{"role": "user", "content": "q"}])


def test_response_formats_become_mime_type_and_schema() -> None:
    as_object = translate(
        [{"role": "user", "content": "q"}], response_format={"type": "json_object"}
    )
    assert as_object["generationConfig"] == {"responseMimeType": "application/json"}
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"a": {"type": "string"}},
    }
    with_schema = translate(
        [{"role": "user", "content": "q"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "out", "strict": True, "schema": schema},
        },
    )
    assert with_schema["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": {"type": "object", "properties": {"a": {"type": "string"}}},
    }


# ---------------------------------------------------------------- answers


def answer(
    parts: list[dict[str, Any]], finish: str | None = "STOP", **extra: Any
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "modelVersion": "gemini-x-001", **extra}


def test_text_answers_become_a_completion_with_usage() -> None:
    out = to_completion(
        answer(
            [{"text": "thinking...", "thought": True}, {"text": "Hello "}, {"text": "world"}],
            usageMetadata={
                "promptTokenCount": 10,
                "candidatesTokenCount": 4,
                "thoughtsTokenCount": 6,
                "totalTokenCount": 20,
            },
        ),
        "gemini-x",
    )
    assert out["object"] == "chat.completion"
    assert out["model"] == "gemini-x-001"
    assert out["choices"] == [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Hello world"},
        }
    ]
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "total_tokens": 20,
        "completion_tokens_details": {"reasoning_tokens": 6},
    }


def test_function_calls_become_tool_calls() -> None:
    out = to_completion(
        answer(
            [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "now"}},
            ]
        ),
        "gemini-x",
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"name": "now", "arguments": "{}"},
    ]
    assert all(CALL_ID.match(c["id"]) and c["type"] == "function" for c in calls)
    assert calls[0]["id"].startswith("call_0_")
    assert calls[1]["id"].startswith("call_1_")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons_map_to_openai(raw: str, expected: str) -> None:
    assert finish_reason(raw, has_calls=False) == expected
    assert (
        to_completion(answer([{"text": "x"}], raw), "m")["choices"][0]["finish_reason"] == expected
    )


def test_a_blocked_prompt_is_an_empty_content_filtered_answer() -> None:
    out = to_completion(
        {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3},
        },
        "m",
    )
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert out["choices"][0]["finish_reason"] == "content_filter"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    with pytest.raises(UpstreamError):
        to_completion({"modelVersion": "m"}, "m")


def test_several_candidates_become_several_choices() -> None:
    resp = answer([{"text": "a"}])
    resp["candidates"].append(
        {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1}
    )
    out = to_completion(resp, "m")
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]


# ---------------------------------------------------------------- streaming


def feed_all(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], StreamTranslator]:
    translator = StreamTranslator("gemini-x")
    return [c for e in events for c in translator.feed(e)], translator


def test_streamed_text_becomes_chunks_then_finish_then_usage() -> None:
    chunks, translator = feed_all(
        [
            answer([{"text": "Hel"}], None, usageMetadata={"promptTokenCount": 5}),
            answer(
                [{"text": "lo"}],
                "STOP",
                usageMetadata={"promptTokenCount": 5, "candidatesTokenCount": 2},
            ),
        ]
    )
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hel"}, None),
        ({"content": "lo"}, None),
        ({}, "stop"),
    ]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gemini-x" for c in chunks)
    assert translator.finished
    last = translator.usage_chunk()
    assert last is not None
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_streamed_function_calls_are_counted_across_events() -> None:
    chunks, translator = feed_all(
        [
            answer([{"functionCall": {"name": "a", "args": {"x": 1}}}], None),
            answer([{"functionCall": {"name": "b", "args": {}}}], "STOP"),
        ]
    )
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (0, "a", '{"x":1}'),
        (1, "b", "{}"),
    ]
    assert all(CALL_ID.match(c["id"]) and c["type"] == "function" for c in calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert translator.finished


def test_a_stream_without_a_finish_reason_is_not_finished() -> None:
    _, translator = feed_all([answer([{"text": "partial"}], None)])
    assert not translator.finished
    assert translator.usage_chunk() is None


def test_a_blocked_streamed_prompt_finishes_with_content_filter() -> None:
    chunks, translator = feed_all([{"promptFeedback": {"blockReason": "OTHER"}}])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "content_filter"]
    assert translator.finished


# ---------------------------------------------------------------- errors, URLs, embeddings


def test_google_errors_are_read_into_message_and_code() -> None:
    assert google_error_reader(
        {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}
    ) == ("quota", "rate_limit_exceeded", None)
    assert google_error_reader(
        [{"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}}]
    ) == ("denied", "permission_denied", None)
    assert google_error_reader(
        {
            "error": {
                "code": 400,
                "message": "API key not valid.",
                "status": "INVALID_ARGUMENT",
                "details": [{"reason": "API_KEY_INVALID"}],
            }
        }
    ) == ("API key not valid.", "invalid_api_key", None)
    assert google_error_reader("not json") == (None, None, None)


@pytest.mark.parametrize(
    ("base", "model", "url"),
    [
        (
            None,
            "gemini-2.0-flash",
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
        ),
        ("http://h:1/", "tunedModels/mine", "http://h:1/v1beta/tunedModels/mine:generateContent"),
        ("http://h:1/v1", "g", "http://h:1/v1/models/g:generateContent"),
    ],
)
def test_urls_name_the_model_and_never_carry_a_key(base: str | None, model: str, url: str) -> None:
    deployment = DeploymentConfig(name="d", provider="gemini", model=model, api_base=base)
    assert gemini_url(deployment, "generateContent") == url


def test_embeddings_translate_both_ways() -> None:
    assert to_embed_request("text-embedding-004", ["ab", "cde"], 3) == {
        "requests": [
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "ab"}]},
                "outputDimensionality": 3,
            },
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "cde"}]},
                "outputDimensionality": 3,
            },
        ]
    }
    resp = {"embeddings": [{"values": [0.5, 0.25]}, {"values": [1.0, -1.0]}]}
    out = to_embeddings(resp, "emb", ["ab", "cdefgh"], None)
    assert out["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, 0.25]},
        {"object": "embedding", "index": 1, "embedding": [1.0, -1.0]},
    ]
    assert out["usage"] == {"prompt_tokens": 2, "total_tokens": 2}  # ceil(8 / 4)
    packed = to_embeddings(resp, "emb", ["ab", "c"], "base64")["data"][1]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (1.0, -1.0)
    with pytest.raises(UpstreamError):
        to_embeddings({"embeddings": [{"values": [1.0]}]}, "emb", ["a", "b"], None)
