"""The same limits kept in this process, for when Redis cannot be reached.

Each replica then enforces its share: every limit divided by the configured replica
count (rounded down, so the replicas together never exceed it), and of a budget, its
share of what was left when Redis last answered. Same one-second buckets as the Redis
script, so a key behaves alike either way.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

from app.ratelimit.periods import period_of
from app.ratelimit.quota import WINDOW_S, Ask, Decision, Meter, Quota, Ticket, to_nano


class _Buckets:
    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def total(self, oldest: int) -> int:
        for s in [s for s in self.counts if s < oldest]:
            del self.counts[s]
        return sum(self.counts.values())

    def wait_for(self, need: int, now: float) -> float:
        freed = 0
        for s in sorted(self.counts):
            freed += self.counts[s]
            if freed >= need:
                return s + WINDOW_S - now
        return float(WINDOW_S)

    def reset_in(self, now: float) -> float:
        return max(self.counts) + WINDOW_S - now if self.counts else 0.0


class LocalWindow:
    def __init__(self, replicas: int) -> None:
        self.replicas = max(1, replicas)
        self._requests: defaultdict[str, _Buckets] = defaultdict(_Buckets)
        self._tokens: defaultdict[str, _Buckets] = defaultdict(_Buckets)
        self._spent: defaultdict[tuple[str, str], int] = defaultdict(int)
        # What Redis last said each key had spent, and in which period (nano-dollars).
        self._known_spent: dict[str, tuple[str, int]] = {}

    def share(self, limit: int) -> int:
        return limit // self.replicas

    def remember_spent(self, key_id: str, period: str | None, spent_usd: float) -> None:
        period_id, _ = period_of(period, time.time())
        self._known_spent[key_id] = (period_id, to_nano(spent_usd))

    def reserve(self, quota: Quota, ask: Ask) -> Decision:
        now = time.time()
        sec = math.floor(now)
        oldest = sec - WINDOW_S + 1
        period_id, ends = period_of(quota.period, now)
        refusal: str | None = None
        wait = 0.0
        reqs, toks = self._requests[quota.key_id], self._tokens[quota.key_id]
        rpm = self.share(quota.rpm) if quota.rpm else 0
        tpm = self.share(quota.tpm) if quota.tpm else 0
        rtotal = reqs.total(oldest) if quota.rpm else 0
        ttotal = toks.total(oldest) if quota.tpm else 0
        if quota.rpm and rtotal + 1 > rpm:
            refusal, wait = "requests", reqs.wait_for(rtotal + 1 - rpm, now)
        elif quota.tpm and ask.tokens > quota.tpm:
            refusal = "too_large"  # over the whole limit: never admissible
        elif quota.tpm and ask.tokens > tpm:
            refusal, wait = "tokens", 1.0  # over this replica's share: until Redis is back
        elif quota.tpm and ttotal + ask.tokens > tpm:
            refusal, wait = "tokens", toks.wait_for(ttotal + ask.tokens - tpm, now)
        cost = 0
        if quota.budget_usd is not None:
            cost = to_nano(ask.cost_usd)
            known_period, known = self._known_spent.get(quota.key_id, (period_id, 0))
            spent_before = known if known_period == period_id else 0
            left = to_nano(quota.budget_usd) - spent_before
            allowance = max(0, left) // self.replicas
            if refusal is None and self._spent[(quota.key_id, period_id)] >= allowance:
                refusal = "budget"
                wait = max(1.0, ends - now) if ends is not None else 86_400.0
        if refusal is None:
            if quota.rpm:
                reqs.counts[sec] = reqs.counts.get(sec, 0) + 1
                rtotal += 1
            if quota.tpm:
                toks.counts[sec] = toks.counts.get(sec, 0) + ask.tokens
                ttotal += ask.tokens
            if quota.budget_usd is not None:
                self._spent[(quota.key_id, period_id)] += cost
        requests = Meter(rpm, max(0, rpm - rtotal), reqs.reset_in(now)) if quota.rpm else None
        tokens = Meter(tpm, max(0, tpm - ttotal), toks.reset_in(now)) if quota.tpm else None
        if refusal is not None:
            retry = None if refusal == "too_large" else wait
            return Decision(False, refusal, retry, requests, tokens)  # type: ignore[arg-type]
        ticket = Ticket(
            quota.key_id,
            sec,
            ask.tokens,
            cost,
            period_id,
            local=True,
            counts_tokens=bool(quota.tpm),
            counts_cost=quota.budget_usd is not None,
        )
        return Decision(True, None, None, requests, tokens, ticket)

    def settle(self, ticket: Ticket, token_delta: int, cost_delta: int) -> None:
        toks = self._tokens.get(ticket.key_id)
        if token_delta and toks is not None and ticket.second in toks.counts:
            toks.counts[ticket.second] = max(0, toks.counts[ticket.second] + token_delta)
        spent_key = (ticket.key_id, ticket.period_id or "total")
        if cost_delta and spent_key in self._spent:
            self._spent[spent_key] = max(0, self._spent[spent_key] + cost_delta)
