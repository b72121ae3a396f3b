"""The deterministic quality rules: every rule, the score they add up to, what a stream
gathers for them, and which outcomes are judged at all."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.api.exchange import Exchange
from app.cycle.gather import AnswerGatherer
from app.cycle.rules import (
    CEILINGS,
    HEAD_CHARS,
    REFUSAL_CORES,
    REFUSAL_MARKERS,
    Expectations,
    Quality,
    rule_score,
    score_answer,
)
from app.cycle.schemas import _validator, conforms
from app.routing.config import DeploymentConfig
from app.routing.router import Target
from app.schemas.chat import CHAT_REQUEST

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},  # no parameters: anything goes
]


def answer(
    content: str | None = "The capital of France is Paris.",
    finish: str | None = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
    **message: Any,
) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content, **message}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
    }


def call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def json_schema(schema: Any) -> Expectations:
    return Expectations({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})


PLAIN = Expectations()
JSON_OBJECT = Expectations({"type": "json_object"})
WITH_TOOLS = Expectations(tools=TOOLS)


@pytest.mark.parametrize(
    ("completion", "expect", "reasons"),
    [
        (answer(), PLAIN, ()),
        (answer(content=""), PLAIN, ("empty",)),
        (answer(content="  \n "), PLAIN, ("empty",)),
        (answer(content=None), PLAIN, ("empty",)),
        ({"choices": []}, PLAIN, ("empty",)),
        ({"object": "chat.completion"}, PLAIN, ("empty",)),
        (answer(finish="length"), PLAIN, ("truncated",)),
        (answer(finish="content_filter"), PLAIN, ("content_filter",)),
        (answer("I'm sorry, but I can't help with that."), PLAIN, ("refusal",)),
        (answer("I\u2019m sorry, but I cannot assist with this request."), PLAIN, ("refusal",)),
        (answer(content=None, refusal="I can't do that."), PLAIN, ("refusal",)),
        (answer('{"a": 1}'), JSON_OBJECT, ()),
        (answer('Sure! {"a": 1'), JSON_OBJECT, ("invalid_json",)),
        (answer("[1, 2]"), JSON_OBJECT, ("invalid_json",)),  # JSON mode promises an object
        (answer('{"a": 1'), JSON_OBJECT, ("invalid_json",)),
        (answer('{"name": "Ada", "age": 36}'), json_schema(PERSON), ()),
        (answer('{"name": "Ada", "age": "36"}'), json_schema(PERSON), ("schema_mismatch",)),
        (answer('{"name": "Ada"}'), json_schema(PERSON), ("schema_mismatch",)),
        (answer('{"name": "Ada"'), json_schema(PERSON), ("invalid_json",)),
        (answer('{"x": 1}'), json_schema(None), ()),  # no schema given: JSON is enough
        (answer('{"x": 1}'), json_schema({"type": "nonsense"}), ("schema_unusable",)),
        (answer('{"x": 1}'), json_schema({"$ref": "#/nowhere"}), ("schema_unusable",)),
        (answer(None, "tool_calls", [call("lookup", '{"q": "x"}')]), WITH_TOOLS, ()),
        (
            answer(None, "tool_calls", [call("lookup", '{"q": ')]),
            WITH_TOOLS,
            ("malformed_tool_arguments",),
        ),
        (
            answer(None, "tool_calls", [call("lookup", '{"q": 3}')]),
            WITH_TOOLS,
            ("tool_schema_mismatch",),
        ),
        (answer(None, "tool_calls", [call("lookup", "{}")]), WITH_TOOLS, ("tool_schema_mismatch",)),
        (answer(None, "tool_calls", [call("ping", '{"any": [1]}')]), WITH_TOOLS, ()),
        (answer(None, "tool_calls", [call("ping", "")]), WITH_TOOLS, ()),  # no arguments
        (answer(None, "tool_calls", [call("launch", "{}")]), WITH_TOOLS, ("unknown_tool",)),
        # Tools the request did not declare cannot be checked, only parsed.
        (answer(None, "tool_calls", [call("lookup", '{"q": 3}')]), PLAIN, ()),
        (
            answer(None, "tool_calls", [call("lookup", "nope")]),
            PLAIN,
            ("malformed_tool_arguments",),
        ),
        # A JSON format does not apply to a tool call's turn.
        (
            answer(None, "tool_calls", [call("lookup", '{"q": "x"}')]),
            Expectations({"type": "json_object"}, TOOLS),
            (),
        ),
        # Several faults: all are reasons, the worst decides.
        (answer('{"name": "Ada"', "length"), json_schema(PERSON), ("invalid_json", "truncated")),
        (answer("", "length"), PLAIN, ("empty", "truncated")),
    ],
)
def test_each_rule(
    completion: dict[str, Any], expect: Expectations, reasons: tuple[str, ...]
) -> None:
    quality = score_answer(completion, expect)
    assert quality.reasons == reasons
    assert quality.score == min((CEILINGS[r] for r in reasons), default=1.0)
    assert 0.0 <= quality.score <= 1.0


def test_every_refusal_marker_passes_the_quick_screen() -> None:
    # `refuses` scans for the markers only when one of these cores is in the head.
    assert all(any(core in m for core in REFUSAL_CORES) for m in REFUSAL_MARKERS)


def test_ceilings_order_the_faults() -> None:
    assert CEILINGS["error"] == CEILINGS["empty"] == 0.0
    assert CEILINGS["invalid_json"] < CEILINGS["refusal"] < CEILINGS["schema_mismatch"]
    assert CEILINGS["truncated"] < CEILINGS["slow"] < 1.0
    assert CEILINGS["schema_unusable"] == 1.0  # the request's fault, not the answer's
    assert score_answer(answer('{"x": 1}'), json_schema({"type": "nonsense"})).score == 1.0


def test_latency_over_the_routes_slo_is_slow() -> None:
    expect = Expectations(latency_slo_ms=500)
    assert score_answer(answer(), expect, 499.0) == Quality(1.0, ())
    assert score_answer(answer(), expect, 501.0) == Quality(0.7, ("slow",))
    assert score_answer(answer(finish="length"), expect, 900.0) == Quality(
        0.3, ("truncated", "slow")
    )
    assert score_answer(answer(), PLAIN, 60_000.0).score == 1.0  # no SLO, no rule


def test_every_choice_counts() -> None:
    two = answer()
    two["choices"].append({"index": 1, "message": {"content": ""}, "finish_reason": "stop"})
    assert score_answer(two, PLAIN) == Quality(0.0, ("empty",))


def test_refusals_are_looked_for_at_the_head_only() -> None:
    late = "Paris. " * 200 + "I'm sorry, but I can't help with that."
    assert score_answer(answer(late), PLAIN).reasons == ()


def test_expectations_of_a_raw_body_tolerate_any_shape() -> None:
    odd = Expectations.of_body({"response_format": "json", "tools": "all of them"}, 10.0)
    assert odd.json_format is None
    assert odd.tool_schemas() is None
    assert score_answer(answer(None, "tool_calls", [call("x", "{}")]), odd).reasons == ()
    assert (
        Expectations.of_body({"response_format": {"type": "json_object"}}).json_format
        == "json_object"
    )


def test_rule_score_keeps_the_ensembles_contract() -> None:
    request = CHAT_REQUEST.validate_python(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": PERSON},
            },
        }
    )
    assert rule_score(request, answer('{"name": "Ada", "age": 36}')) == (1.0, "ok")
    assert rule_score(request, answer('{"name": 1, "age": 36}')) == (0.3, "schema_mismatch")
    # The main reason is the worst one.
    assert rule_score(request, answer('{"name": 1', "length")) == (0.1, "invalid_json")
    tools = CHAT_REQUEST.validate_python(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    )
    assert rule_score(tools, answer(None, "tool_calls", [call("lookup", '{"q": 1}')])) == (
        0.3,
        "tool_schema_mismatch",
    )


def test_validators_are_compiled_once_per_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reordered = {"required": ["n"], "properties": {"n": {"type": "integer"}}, "type": "object"}
    _validator.cache_clear()
    assert conforms(schema, {"n": 1}) is True
    assert conforms(reordered, {"n": "one"}) is False  # the same schema, keys in another order
    assert conforms(schema, {}) is False
    info = _validator.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert conforms({"type": 7}, {}) is None
    assert conforms("not a schema", {}) is None
    assert conforms({"type": 7}, {}) is None
    assert _validator.cache_info().misses == 2  # an unusable schema is remembered too


# Streams: what the gatherer keeps scores as the whole answer would.


def chunks_of(
    text: str, finish: str = "stop", calls: list[tuple[str, str]] = (), piece: int = 7
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    ]
    out += [
        {
            "choices": [
                {"index": 0, "delta": {"content": text[i : i + piece]}, "finish_reason": None}
            ]
        }
        for i in range(0, len(text), piece)
    ]
    for i, (name, _) in enumerate(calls):
        head = {
            "index": i,
            "id": f"c{i}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        out.append({"choices": [{"index": 0, "delta": {"tool_calls": [head]}}]})
    # Arguments of the calls interleaved, as parallel tool calls may arrive.
    for start in range(0, max((len(a) for _, a in calls), default=0), 3):
        for i, (_, args) in enumerate(calls):
            if args[start : start + 3]:
                delta = {
                    "tool_calls": [{"index": i, "function": {"arguments": args[start : start + 3]}}]
                }
                out.append({"choices": [{"index": 0, "delta": delta}]})
    out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    out.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    return out


def gathered(chunks: list[dict[str, Any]], whole_text: bool) -> dict[str, Any]:
    g = AnswerGatherer(whole_text)
    for chunk in chunks:
        for choice in chunk["choices"]:
            g.feed(choice.get("index", 0), choice.get("delta") or {}, choice.get("finish_reason"))
    return g.answer()


@pytest.mark.parametrize(
    ("text", "finish", "calls", "expect", "reasons"),
    [
        ("Paris is the capital.", "stop", [], PLAIN, ()),
        ("", "stop", [], PLAIN, ("empty",)),
        ("I'm sorry, but I can't help with that.", "stop", [], PLAIN, ("refusal",)),
        ("Paris", "length", [], PLAIN, ("truncated",)),
        ('{"name": "Ada", "age": 36}', "stop", [], json_schema(PERSON), ()),
        ('{"name": "Ada", "age": "x"}', "stop", [], json_schema(PERSON), ("schema_mismatch",)),
        ('{"answer": 4', "stop", [], JSON_OBJECT, ("invalid_json",)),
        ("", "tool_calls", [("lookup", '{"q": "x"}'), ("ping", "{}")], WITH_TOOLS, ()),
        (
            "",
            "tool_calls",
            [("lookup", '{"q": "x"}'), ("ping", '{"a": ')],
            WITH_TOOLS,
            ("malformed_tool_arguments",),
        ),
        ("", "tool_calls", [("lookup", '{"q": 1}')], WITH_TOOLS, ("tool_schema_mismatch",)),
    ],
)
def test_a_gathered_stream_scores_as_its_answer(
    text: str,
    finish: str,
    calls: list[tuple[str, str]],
    expect: Expectations,
    reasons: tuple[str, ...],
) -> None:
    got = gathered(chunks_of(text, finish, calls), whole_text=expect.json_format is not None)
    assert score_answer(got, expect).reasons == reasons
    whole = answer(text or None, finish, [call(n, a) for n, a in calls] if calls else None)
    assert score_answer(whole, expect).reasons == reasons


def test_the_gatherer_keeps_only_the_head_unless_json_is_wanted() -> None:
    text = "word " * 5000
    head = gathered(chunks_of(text), whole_text=False)["choices"][0]["message"]["content"]
    assert HEAD_CHARS <= len(head) < HEAD_CHARS + 10
    whole = gathered(chunks_of(text), whole_text=True)["choices"][0]["message"]["content"]
    assert whole == text
    # Blank then text: not empty, though the head kept is only blanks.
    late = gathered(chunks_of(" " * 1000 + "Paris"), whole_text=False)
    assert score_answer(late, PLAIN).reasons == ()


def test_the_gatherer_keeps_choices_apart_and_survives_odd_indexes() -> None:
    g = AnswerGatherer(whole_text=True)
    g.feed(1, {"content": '{"b": 2}'}, "stop")
    g.feed(0, {"content": '{"a": 1}'}, "stop")
    g.feed(None, {"refusal": "no"}, None)  # a missing index is choice 0
    g.feed(0, {"tool_calls": [{"index": "x", "function": {"name": "f", "arguments": "{}"}}]}, None)
    choices = g.answer()["choices"]
    assert [c["message"]["content"] for c in choices] == ['{"a": 1}', '{"b": 2}']
    assert choices[0]["message"]["refusal"] is True
    assert choices[0]["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": "{}"}}]


# Which outcomes are judged: only what an upstream did.


def exchange(endpoint: str = "chat.completions", target: bool = True) -> Exchange:
    ex = Exchange("chatcmpl-1", endpoint)
    if target:
        deployment = DeploymentConfig(name="d", provider="openai", model="m")
        ex.target = Target("r", deployment, None, 10.0)
    ex.answer = answer()
    return ex


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 429])
def test_what_the_gateway_refused_is_not_judged(status: int) -> None:
    assert exchange().quality(status, 1.0) is None
    assert exchange(target=False).quality(status, 1.0) is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_an_upstream_failure_scores_zero(status: int) -> None:
    assert exchange().quality(status, 1.0) == Quality(0.0, ("error",))
    # The gateway failed before any deployment was tried (e.g. every circuit open).
    assert exchange(target=False).quality(status, 1.0) is None


def test_disconnects_and_other_endpoints_are_not_judged() -> None:
    assert exchange().quality(499, 1.0) is None
    assert exchange("embeddings").quality(200, 1.0) is None
    assert exchange("embeddings").quality(502, 1.0) is None
    ex = exchange()
    ex.answer = None  # an answer the rules never saw
    assert ex.quality(200, 1.0) is None


def test_answers_are_judged_with_the_requests_expectations() -> None:
    ex = exchange(target=False)  # a cache hit names no deployment: judged all the same
    assert ex.quality(200, 5.0) == Quality(1.0, ())
    ex.expect = Expectations({"type": "json_object"}, latency_slo_ms=1.0)
    assert ex.quality(200, 5.0) == Quality(0.1, ("invalid_json", "slow"))
    assert ex.wants_whole_text
    ex.answer = {"choices": "not a list of choices"}
    assert ex.quality(200, 0.5) == Quality(0.0, ("empty",))


def test_a_broken_answer_never_breaks_scoring() -> None:
    odd: list[dict[str, Any]] = [
        {"choices": ["oops"]},
        {"choices": [{"message": "text", "finish_reason": 3}]},
        {"choices": [{"message": {"content": 5, "tool_calls": ["x", {"function": "f"}]}}]},
        {"choices": [{"message": {"content": [{"type": "text", "text": "hi"}]}}]},
    ]
    for completion in odd:
        quality = score_answer(completion, Expectations(tools=TOOLS))
        assert 0.0 <= quality.score <= 1.0, json.dumps(completion)
