"""An in-process provider for demos, tests and benchmarks.

A deployment's `mock` block sets mean latency, jitter, error rate and a quality level:
the share of good answers against degraded ones (empty, truncated, refusal, invalid
JSON), which is what the virtuous cycle learns to route around. Outcomes are
deterministic for a given seed: the n-th call to a deployment, or any call carrying the
same request `seed` and messages, always behaves the same.

A deployment whose block sets `steerable: true` can be degraded on demand (demos and
drills): a request's `metadata["mock.<deployment>.<field>"]` sets one of STEERABLE for
that request alone, e.g. `{"mock.cycle-premium.quality": "0.3"}`. Carried by the
request rather than kept as shared state: nothing to reset afterwards, no I/O on the
call, and only the requests that ask are affected.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from app.errors import InvalidRequestError, UpstreamStatusError
from app.providers.base import JSON, ChatCall, EmbedCall, chunk, completion, usage
from app.routing.config import MockParams
from app.schemas.chat import ChatCompletionRequest, ResponseFormatJSONSchema, text_of

DEGRADED_KINDS = ("empty", "truncated", "refusal", "invalid_json")
REFUSAL = "I'm sorry, but I can't help with that request."
EMBEDDING_DIMENSIONS = 256
STEERABLE = frozenset({"quality", "error_rate", "latency_ms", "jitter_ms"})


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4)) if text else 0


def prompt_tokens(request: ChatCompletionRequest) -> int:
    return sum(3 + estimate_tokens(text_of(m.content)) for m in request.messages) + 3


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "good", "error" or one of DEGRADED_KINDS
    latency_s: float
    rng: random.Random


def example_for(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A small instance of a JSON schema: enough for structured-output demos."""
    if not isinstance(schema, dict) or depth > 6:
        return "value"
    # A client's schema may be anything of the right outer shape: a keyword of the wrong
    # type is skipped, never a crash.
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_for(schema[key][0], rng, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {k: example_for(v, rng, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [example_for(schema.get("items", {}), rng, depth + 1)]
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return f"mock-{rng.randint(1000, 9999)}"


def steered(call: ChatCall) -> MockParams:
    """The deployment's mock block, with what the request's metadata sets when the block
    allows it; a value out of range is the client's error (400)."""
    params = call.deployment.mock or MockParams()
    meta = call.request.metadata
    if not params.steerable or not meta:
        return params
    head = f"mock.{call.deployment.name}."
    changes = {k[len(head) :]: v for k, v in meta.items() if k.startswith(head)}
    if not changes:
        return params
    unknown = sorted(set(changes) - STEERABLE)
    if unknown:
        raise InvalidRequestError(
            f"metadata: mock fields {unknown} cannot be steered", param="metadata"
        )
    try:
        return MockParams.model_validate({**params.model_dump(), **changes})
    except ValidationError as e:
        error = e.errors()[0]
        raise InvalidRequestError(
            f"metadata: {head}{error['loc'][0]}: {error['msg']}", param="metadata"
        ) from e


class MockProvider:
    def __init__(self) -> None:
        self._calls: dict[str, int] = {}

    def _outcome(self, call: ChatCall) -> Outcome:
        params = steered(call)
        if call.request.seed is not None:
            digest = hashlib.sha256(orjson.dumps(call.body.get("messages"))).hexdigest()
            key = f"{params.seed}:{call.deployment.name}:{call.request.seed}:{digest}"
        else:
            n = self._calls.get(call.deployment.name, 0)
            self._calls[call.deployment.name] = n + 1
            key = f"{params.seed}:{call.deployment.name}:{n}"
        rng = random.Random(key)
        latency_s = max(0.0, rng.gauss(params.latency_ms, params.jitter_ms)) / 1000
        if rng.random() < params.error_rate:
            return Outcome("error", latency_s, rng)
        if rng.random() < params.quality:
            return Outcome("good", latency_s, rng)
        return Outcome(rng.choice(DEGRADED_KINDS), latency_s, rng)

    def _message(self, call: ChatCall, outcome: Outcome) -> tuple[JSON, str]:
        request, rng = call.request, outcome.rng
        tool = self._tool_to_call(request)
        if tool is not None and outcome.kind in ("good", "invalid_json"):
            params = tool.get("parameters") or {}
            args = orjson.dumps(example_for(params, rng)).decode()
            if outcome.kind == "invalid_json":
                args = args[: max(1, len(args) // 2)]
            tool_call = {
                "id": f"call_{rng.getrandbits(64):016x}",
                "type": "function",
                "function": {"name": tool["name"], "arguments": args},
            }
            return {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"
        text, finish = self._text(call, outcome)
        return {"role": "assistant", "content": text}, finish

    @staticmethod
    def _tool_to_call(request: ChatCompletionRequest) -> JSON | None:
        if not request.tools or request.tool_choice == "none":
            return None
        if request.messages[-1].role == "tool" and request.tool_choice != "required":
            return None
        choice = request.tool_choice
        if choice is not None and not isinstance(choice, str):
            wanted = choice.function.get("name")
            for tool in request.tools:
                if tool.function.name == wanted:
                    return tool.function.model_dump(exclude_none=True)
        return request.tools[0].function.model_dump(exclude_none=True)

    def _text(self, call: ChatCall, outcome: Outcome) -> tuple[str, str]:
        request, rng = call.request, outcome.rng
        last = text_of(request.messages[-1].content).strip() or "your message"
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if isinstance(fmt, ResponseFormatJSONSchema) else None
            value = example_for(schema, rng) if schema else {"answer": f"About: {last[:80]}"}
            good = orjson.dumps(value).decode()
        else:
            good = (
                f'[{call.deployment.model}] A considered answer to "{last[:120]}": '
                "the short version is yes, with the details depending on your context."
            )
        text, finish = good, "stop"
        if outcome.kind == "empty":
            text = ""
        elif outcome.kind == "refusal":
            text = REFUSAL
        elif outcome.kind == "truncated":
            text, finish = good[: max(1, len(good) // 3)], "length"
        elif outcome.kind == "invalid_json":
            text = good[: max(1, len(good) - 2)] if good.startswith("{") else "{" + good
        limit = request.output_limit
        if limit is not None and estimate_tokens(text) > limit:
            text, finish = text[: limit * 4], "length"
        return text, finish

    def _usage(self, call: ChatCall, message: JSON) -> JSON:
        produced = message.get("content") or orjson.dumps(message.get("tool_calls")).decode()
        return usage(prompt_tokens(call.request), estimate_tokens(produced))

    async def _fail_or_wait(self, outcome: Outcome, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        if outcome.kind == "error":
            raise UpstreamStatusError(500, "mock upstream error (injected)")

    async def complete(self, call: ChatCall) -> JSON:
        outcome = self._outcome(call)
        await self._fail_or_wait(outcome, outcome.latency_s)
        message, finish = self._message(call, outcome)
        return completion(
            model=call.deployment.model,
            message=message,
            finish_reason=finish,
            usage=self._usage(call, message),
        )

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        outcome = self._outcome(call)
        # About 40% of the latency goes to the first token, the rest is spread over chunks.
        await self._fail_or_wait(outcome, outcome.latency_s * 0.4)
        message, finish = self._message(call, outcome)
        model = call.deployment.model
        yield chunk(model=model, delta={"role": "assistant", "content": ""})
        deltas = self._deltas(message)
        gap = outcome.latency_s * 0.6 / max(1, len(deltas))
        for delta in deltas:
            if gap:
                await asyncio.sleep(gap)
            yield chunk(model=model, delta=delta)
        yield chunk(model=model, delta={}, finish_reason=finish)
        yield chunk(model=model, usage=self._usage(call, message))

    @staticmethod
    def _deltas(message: JSON) -> list[JSON]:
        if message.get("tool_calls"):
            out: list[JSON] = []
            for index, tc in enumerate(message["tool_calls"]):
                head = {
                    "index": index,
                    "id": tc["id"],
                    "type": "function",
                    "function": {"name": tc["function"]["name"], "arguments": ""},
                }
                out.append({"tool_calls": [head]})
                args = tc["function"]["arguments"]
                out.extend(
                    {"tool_calls": [{"index": index, "function": {"arguments": args[i : i + 16]}}]}
                    for i in range(0, len(args), 16)
                )
            return out
        text: str = message.get("content") or ""
        words = text.split(" ")
        return [{"content": w if i == 0 else " " + w} for i, w in enumerate(words) if text]

    async def embed(self, call: EmbedCall) -> JSON:
        params = call.deployment.mock or MockParams()
        await asyncio.sleep(params.latency_ms / 4000)
        dims = call.request.dimensions or EMBEDDING_DIMENSIONS
        texts = call.request.texts
        b64 = call.request.encoding_format == "base64"
        # Large batches are CPU work: off the event loop.
        if len(texts) * dims > 50_000:
            data = await asyncio.to_thread(_embeddings, texts, dims, params.seed, b64)
        else:
            data = _embeddings(texts, dims, params.seed, b64)
        total = sum(estimate_tokens(t) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": call.deployment.model,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }


def _embeddings(texts: list[str], dims: int, seed: int, b64: bool) -> list[JSON]:
    data: list[JSON] = []
    for index, text in enumerate(texts):
        vector = _vector(f"{seed}:{text}", dims)
        encoded: Any = vector
        if b64:
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return data


def _vector(key: str, dims: int) -> list[float]:
    rng = random.Random(key)
    raw = [rng.gauss(0, 1) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
