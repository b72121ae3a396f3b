"""The soak's traffic mix, and how each answer is judged.

Every request is one of a few kinds. Each kind says what it sends and which answers
are right for it: a success, an expected error (the flaky upstream's 5xx, a client's
unknown model or malformed body, answered as OpenAI does), or anything else, which is
unexpected and fails the run (a wrong status, a body that is not OpenAI-shaped, a
stream without `[DONE]`, a timeout, a refused connection).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from bench.body import AUTHORIZATION, ChatBody
from bench.check import EXPECTED, stream_content

# Repeated prompts: few enough that each is answered from the cache after its first
# request (per tier), many enough that the cache is more than one entry.
POOL = 32
# The route every cached request uses, by stream-ness; the flaky route's.
JSON_ROUTE, STREAM_ROUTE, FLAKY_ROUTE = "soak-json", "soak-stream", "soak-flaky"
UNKNOWN_MODEL = "soak-no-such-model"
UPSTREAM_TROUBLE = (502, 503, 504)

OK = "ok"
HEADERS = {"content-type": "application/json", "authorization": AUTHORIZATION}


@dataclass(frozen=True)
class Request:
    kind: str
    body: bytes
    stream: bool


@dataclass(frozen=True)
class Answer:
    status: int
    cache: str | None  # x-flywheel-cache
    content_type: str
    text: str


# An answer's verdict: (category, label). Category is "ok", "expected" or "unexpected";
# the label names the error ("upstream 502", "404 model_not_found", "timeout", …).
Verdict = tuple[str, str]


def _error_shape(answer: Answer) -> dict[str, object] | None:
    """The OpenAI error object of a JSON answer, or None when it is not one."""
    try:
        error = json.loads(answer.text)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= error.keys():
        return None
    return error


def _success(answer: Answer, stream: bool) -> Verdict:
    if answer.status != 200:
        shaped = "" if _error_shape(answer) is not None else ", not OpenAI-shaped"
        return "unexpected", f"{answer.status}{shaped}"
    try:
        if stream:
            if not answer.content_type.startswith("text/event-stream"):
                return "unexpected", f"stream as {answer.content_type or 'no content-type'}"
            content = stream_content(answer.text)
        else:
            content = json.loads(answer.text)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return "unexpected", f"malformed 200 ({str(exc)[:60]})"
    if content != EXPECTED:
        return "unexpected", "wrong content"
    return OK, OK


def _expected_error(status: int, error_type: str, code: str | None) -> Callable[[Answer], Verdict]:
    def judge(answer: Answer) -> Verdict:
        error = _error_shape(answer)
        if answer.status != status or error is None:
            shaped = "" if error is not None else ", not OpenAI-shaped"
            return "unexpected", f"{answer.status}{shaped} (wanted {status})"
        if error["type"] != error_type or (code is not None and error["code"] != code):
            return "unexpected", f"{status} {error['type']}/{error['code']}"
        return "expected", f"{status} {code or error_type}"

    return judge


def _flaky(answer: Answer) -> Verdict:
    if answer.status in UPSTREAM_TROUBLE:
        error = _error_shape(answer)
        if error is None:
            return "unexpected", f"{answer.status}, not OpenAI-shaped"
        # With the code: a 503 may be open breakers or saturated concurrency limits.
        code = f" {error['code']}" if error["code"] else ""
        return "expected", f"upstream {answer.status}{code}"
    return _success(answer, stream=False)


Maker = Callable[[int, random.Random], Request]


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int  # percent of the requests
    describe: str
    make: Maker
    judge: Callable[[Answer], Verdict]
    cached: bool = False  # its route caches: count the cache tiers it was served from


def _chat(kind: str, model: str, stream: bool, pooled: bool) -> Maker:
    body = ChatBody(model, stream, unique=True)

    def make(n: int, rng: random.Random) -> Request:
        # Pooled prompts are "Say hello (0..POOL-1)"; unique ones count on from POOL.
        number = rng.randrange(POOL) if pooled else POOL + n
        return Request(kind, body.numbered(number).encode(), stream)

    return make


def _bad(n: int, rng: random.Random) -> Request:
    # Alternately a body that is not JSON and one without `messages`: both 400s.
    if n % 2:
        return Request("bad_request", b'{"model": "soak-json", "messages": [', False)
    return Request("bad_request", json.dumps({"model": JSON_ROUTE}).encode(), False)


def _judge_success(stream: bool) -> Callable[[Answer], Verdict]:
    return lambda answer: _success(answer, stream)


KINDS: tuple[Kind, ...] = (
    Kind(
        "hit",
        35,
        f"JSON, one of {POOL} repeated prompts (cache hits)",
        _chat("hit", JSON_ROUTE, False, True),
        _judge_success(False),
        cached=True,
    ),
    Kind(
        "miss",
        15,
        "JSON, a unique prompt (cache miss, then written)",
        _chat("miss", JSON_ROUTE, False, False),
        _judge_success(False),
        cached=True,
    ),
    Kind(
        "stream",
        20,
        "SSE, a unique prompt (streamed from upstream, then cached)",
        _chat("stream", STREAM_ROUTE, True, False),
        _judge_success(True),
        cached=True,
    ),
    Kind(
        "stream_hit",
        5,
        f"SSE, one of {POOL} repeated prompts (replayed from the cache)",
        _chat("stream_hit", STREAM_ROUTE, True, True),
        _judge_success(True),
        cached=True,
    ),
    Kind(
        "flaky",
        15,
        "JSON to an upstream failing 1 call in 4, one retry (some 502s expected)",
        _chat("flaky", FLAKY_ROUTE, False, False),
        _flaky,
    ),
    Kind(
        "unknown_model",
        5,
        f"JSON for model {UNKNOWN_MODEL!r} (404 model_not_found expected)",
        lambda n, rng: Request(
            "unknown_model", ChatBody(UNKNOWN_MODEL, False, True).numbered(n).encode(), False
        ),
        _expected_error(404, "invalid_request_error", "model_not_found"),
    ),
    Kind(
        "bad_request",
        5,
        "malformed JSON, or no `messages` (400 invalid_request_error expected)",
        _bad,
        _expected_error(400, "invalid_request_error", None),
    ),
)
BY_NAME = {k.name: k for k in KINDS}
assert sum(k.weight for k in KINDS) == 100


class Mix:
    """Draws the kinds by weight, reproducibly for a seed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._names = [k.name for k in KINDS]
        self._weights = [k.weight for k in KINDS]

    def next(self, n: int) -> Request:
        kind = BY_NAME[self._rng.choices(self._names, self._weights)[0]]
        return kind.make(n, self._rng)


def cache_write_share() -> float:
    """The share of requests that write a new cache entry (unique prompts on a cached route)."""
    return sum(k.weight for k in KINDS if k.cached and k.name in ("miss", "stream")) / 100
