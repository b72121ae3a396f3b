"""Deterministic quality rules: a score in [0, 1] for one answer, with every reason found.

Every chat answer the gateway records is scored with these (no LLM, a few microseconds);
the virtuous cycle reads the score as the weakest signal (feedback > judge > rules), and
ensembles use it to break ties. Each reason caps the score at its ceiling and the score
is the lowest cap found, so one bad trait decides and a clean answer scores 1:

    error 0 · empty 0 · malformed_tool_arguments 0.1 · invalid_json 0.1 · refusal 0.2 ·
    content_filter 0.2 · truncated 0.3 · schema_mismatch 0.3 · tool_schema_mismatch 0.3 ·
    unknown_tool 0.3 · slow 0.7 · schema_unusable 1 (noted, not held against the answer)

Only what the upstream did counts: an answer the gateway refused itself (bad input,
keys, limits, unknown model) or one the client walked away from has no score (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app.cycle.schemas import conforms
from app.schemas.chat import ChatCompletionRequest

CEILINGS: dict[str, float] = {
    "error": 0.0,
    "empty": 0.0,
    "malformed_tool_arguments": 0.1,
    "invalid_json": 0.1,
    "refusal": 0.2,
    "content_filter": 0.2,
    "truncated": 0.3,
    "schema_mismatch": 0.3,
    "tool_schema_mismatch": 0.3,
    "unknown_tool": 0.3,
    "slow": 0.7,
    "schema_unusable": 1.0,
}

# Refusals open the answer: only its head is searched (and kept from a stream).
HEAD_CHARS = 400
REFUSAL_MARKERS = (
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "i am sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm sorry, i can't",
    "i'm sorry, i cannot",
    "i cannot help with",
    "i can't help with",
    "i can't assist",
    "i cannot assist",
    "i won't be able to",
    "i'm unable to help",
    "i am unable to help",
    "i'm not able to help",
    "i can't comply",
    "i cannot comply",
    "i must decline",
)
REFUSAL_CORES = ("i can", "i won", "unable", "not able", "decline")
_JSON_FORMATS = ("json_object", "json_schema")


@dataclass(frozen=True, slots=True)
class Quality:
    score: float
    reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, reasons: list[str]) -> Quality:
        if not reasons:
            return CLEAN  # most answers: no object built
        unique = tuple(dict.fromkeys(reasons))  # in the order found, once each
        return cls(min(CEILINGS[r] for r in unique), unique)


CLEAN = Quality(1.0)
ERROR = Quality(0.0, ("error",))


@dataclass(frozen=True, slots=True)
class Expectations:
    """What a request asked of its answer: held by reference from the raw body (read only
    when scoring, so noting them costs nothing), plus its route's latency SLO."""

    response_format: Any = None
    tools: Any = None
    latency_slo_ms: float | None = None

    @classmethod
    def of_body(cls, body: dict[str, Any], latency_slo_ms: float | None = None) -> Expectations:
        return cls(body.get("response_format"), body.get("tools"), latency_slo_ms)

    @classmethod
    def of_request(cls, request: ChatCompletionRequest) -> Expectations:
        fmt = request.response_format
        return cls(
            None if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True),
            None if not request.tools else [t.model_dump(exclude_none=True) for t in request.tools],
        )

    @property
    def json_format(self) -> str | None:
        """The JSON format the request asked for (json_object, json_schema), or None."""
        fmt = self.response_format
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        return kind if kind in _JSON_FORMATS else None

    def tool_schemas(self) -> dict[str, Any] | None:
        """The request's functions by name (their parameter schemas); None: no tools."""
        if not isinstance(self.tools, list) or not self.tools:
            return None
        out: dict[str, Any] = {}
        for tool in self.tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                out[function["name"]] = function.get("parameters")
        return out


def score_answer(
    answer: dict[str, Any], expect: Expectations, latency_ms: float | None = None
) -> Quality:
    """The rules' verdict on a `chat.completion` (the lowest of its choices)."""
    reasons: list[str] = []
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        reasons.append("empty")
    else:
        for choice in choices:
            _choice(choice, expect, reasons)
    slo = expect.latency_slo_ms
    if slo is not None and latency_ms is not None and latency_ms > slo:
        reasons.append("slow")
    return Quality.of(reasons)


def rule_score(request: ChatCompletionRequest, completion: dict[str, Any]) -> tuple[float, str]:
    """The score and the main reason ("ok" when none): how ensembles rank answers."""
    quality = score_answer(completion, Expectations.of_request(request))
    worst = min(quality.reasons, key=CEILINGS.__getitem__, default="ok")
    return quality.score, worst


def _choice(choice: Any, expect: Expectations, out: list[str]) -> None:
    if not isinstance(choice, dict):
        out.append("empty")
        return
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}
    content = _text(message.get("content"))
    calls = message.get("tool_calls") or []
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls = [*calls, {"function": legacy}]
    if calls:
        _tool_calls(calls, expect, out)
    if message.get("refusal"):
        out.append("refusal")
    elif not calls and not content.strip():
        out.append("empty")
    elif content:
        if refuses(content):
            out.append("refusal")
        elif not calls and expect.json_format is not None:
            _json_content(content, expect, out)
    finish = choice.get("finish_reason")
    if finish == "length":
        out.append("truncated")
    elif finish == "content_filter":
        out.append("content_filter")


def refuses(content: str) -> bool:
    head = content[:HEAD_CHARS].lower().replace("\u2019", "'")
    # Every marker holds one of these: five scans clear almost every answer, instead
    # of one scan per marker.
    if not any(core in head for core in REFUSAL_CORES):
        return False
    return any(marker in head for marker in REFUSAL_MARKERS)


def _json_content(content: str, expect: Expectations, out: list[str]) -> None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        out.append("invalid_json")
        return
    if expect.json_format == "json_object":
        if not isinstance(value, dict):
            out.append("invalid_json")  # JSON mode promises an object
        return
    spec = expect.response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None:
        return
    verdict = conforms(schema, value)
    if verdict is None:
        out.append("schema_unusable")
    elif not verdict:
        out.append("schema_mismatch")


def _tool_calls(calls: list[Any], expect: Expectations, out: list[str]) -> None:
    schemas = expect.tool_schemas()
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            out.append("malformed_tool_arguments")
            continue
        raw = function.get("arguments")
        try:
            args = orjson.loads(raw if isinstance(raw, str | bytes) and raw else b"{}")
        except orjson.JSONDecodeError:
            out.append("malformed_tool_arguments")
            continue
        if schemas is None:
            continue
        name = function.get("name")
        if name not in schemas:
            out.append("unknown_tool")
            continue
        parameters = schemas[name]
        if parameters is None:
            continue
        verdict = conforms(parameters, args)
        if verdict is None:
            out.append("schema_unusable")
        elif not verdict:
            out.append("tool_schema_mismatch")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts, as some providers answer
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""
