"""What a key may spend, what a request asks for, and the limiter's answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WINDOW_S = 60  # requests and tokens are counted per minute, over a sliding window
NANO = 1_000_000_000  # budgets are kept in nano-dollars: integers, so Redis adds exactly

Refusal = Literal["requests", "tokens", "too_large", "budget", "unavailable"]


@dataclass(frozen=True, slots=True)
class Quota:
    key_id: str
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    period: str | None = None  # day, week, month or total

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.budget_usd is None


@dataclass(frozen=True, slots=True)
class Ask:
    tokens: int  # prompt tokens counted + the completion tokens the request allows
    cost_usd: float  # what those would cost at the route's dearest deployment


@dataclass(frozen=True, slots=True)
class Meter:
    """One limit as the `x-ratelimit-*` headers report it."""

    limit: int
    remaining: int
    reset_s: float  # until everything counted now has left the window


@dataclass(frozen=True, slots=True)
class Ticket:
    """A granted reservation, settled against the real usage once the answer is known."""

    key_id: str
    second: int  # the window bucket the reservation went into
    tokens: int
    cost_nano: int
    period_id: str | None
    local: bool  # reserved in this process while Redis was unreachable
    counts_tokens: bool = False  # the key has a TPM limit
    counts_cost: bool = False  # the key has a budget


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    refusal: Refusal | None = None
    retry_after_s: float | None = None
    requests: Meter | None = None
    tokens: Meter | None = None
    ticket: Ticket | None = None


def to_nano(usd: float) -> int:
    return round(usd * NANO)
