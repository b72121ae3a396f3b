"""Merging the answers of an ensemble route's members into one completion.

`first_success` takes the first answer; `voting` the majority over normalised answers
(ties broken by rule quality); `best_of_n` the highest rule-quality answer;
`concatenate` labelled sections; `ensemble` the mean of numeric answers.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from app.cycle.rules import rule_score
from app.errors import UpstreamError
from app.routing.config import EnsembleStrategy
from app.schemas.chat import ChatCompletionRequest

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True, slots=True)
class Member:
    route: str
    completion: dict[str, Any]
    seconds: float

    @property
    def content(self) -> str:
        message = (self.completion.get("choices") or [{}])[0].get("message") or {}
        return str(message.get("content") or "")


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?")


def merge(
    strategy: EnsembleStrategy, request: ChatCompletionRequest, members: list[Member]
) -> dict[str, Any]:
    """One completion from the members' (in the order they finished)."""
    if not members:
        raise UpstreamError("every ensemble member failed")
    scored = [(rule_score(request, m.completion)[0], m) for m in members]
    if strategy == "first_success":
        return members[0].completion
    if strategy == "best_of_n":
        return max(scored, key=lambda sm: (sm[0], -sm[1].seconds))[1].completion
    if strategy == "voting":
        votes = Counter(normalise(m.content) for m in members)
        top = max(votes.values())
        winners = [(score, m) for score, m in scored if votes[normalise(m.content)] == top]
        return max(winners, key=lambda sm: (sm[0], -sm[1].seconds))[1].completion
    if strategy == "concatenate":
        text = "\n\n".join(f"### {m.route}\n{m.content}" for m in members)
        return _with_content(members[0].completion, text, members)
    numbers = [float(found.group()) for m in members if (found := _NUMBER.search(m.content))]
    if not numbers:
        raise UpstreamError("no ensemble member gave a numeric answer")
    mean = sum(numbers) / len(numbers)
    return _with_content(members[0].completion, f"{mean:g}", members)


def _with_content(base: dict[str, Any], text: str, members: list[Member]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    prompt = completion = 0
    for m in members:
        usage = m.completion.get("usage") or {}
        prompt += int(usage.get("prompt_tokens") or 0)
        completion += int(usage.get("completion_tokens") or 0)
    out["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return out
