"""Per-key limits in Redis: one Lua script decides and reserves atomically.

Requests and tokens are counted in one-second buckets (a hash per key, field = Unix
second) and a request is admitted when the buckets of the last 60 seconds leave room:
a sliding window of whole seconds, so N replicas sharing Redis never admit more than the
limit in any 60 consecutive one-second buckets (the window moves a second at a time, so
a bucket's requests are released together as it leaves). The script reads Redis's own
clock (TIME), so replicas whose clocks disagree still share one window. Budgets are one
counter per key and period, in nano-dollars. The keys one call touches share a hash
tag, as a Redis Cluster would need, but Flywheel runs on a single Redis endpoint (its
other clients and arq's queue address one node; see the README's high availability).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from app.ratelimit.periods import period_of
from app.ratelimit.quota import WINDOW_S, Ask, Decision, Meter, Quota, Ticket, to_nano

RESERVE = """
local window = tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sec = math.floor(now)
local oldest = sec - window + 1

local function scan(key)
  local flat = redis.call('HGETALL', key)
  local buckets, total = {}, 0
  for i = 1, #flat, 2 do
    local s, n = tonumber(flat[i]), tonumber(flat[i + 1])
    if s < oldest then
      redis.call('HDEL', key, flat[i])
    else
      total = total + n
      buckets[#buckets + 1] = {s, n}
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  return buckets, total
end

-- seconds until buckets leaving the window free `need` units
local function wait_for(buckets, need)
  local freed = 0
  for _, b in ipairs(buckets) do
    freed = freed + b[2]
    if freed >= need then return b[1] + window - now end
  end
  return window
end

local function reset_in(buckets)
  if #buckets == 0 then return 0 end
  return buckets[#buckets][1] + window - now
end

local rpm, tpm, ask = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local refusal, wait = '', 0
local reqs, rtotal, toks, ttotal = {}, 0, {}, 0
if rpm > 0 then
  reqs, rtotal = scan(KEYS[1])
  if rtotal + 1 > rpm then refusal, wait = 'requests', wait_for(reqs, rtotal + 1 - rpm) end
end
if tpm > 0 then
  toks, ttotal = scan(KEYS[2])
  if refusal == '' then
    if ask > tpm then refusal = 'too_large'
    elseif ttotal + ask > tpm then refusal, wait = 'tokens', wait_for(toks, ttotal + ask - tpm)
    end
  end
end
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if refusal == '' and spent >= budget then refusal, wait = 'budget', tonumber(ARGV[6]) end
end
if refusal == '' then
  if rpm > 0 then
    redis.call('HINCRBY', KEYS[1], sec, 1)
    redis.call('EXPIRE', KEYS[1], window + 1)
    rtotal = rtotal + 1
    reqs[#reqs + 1] = {sec, 1}
  end
  if tpm > 0 then
    redis.call('HINCRBY', KEYS[2], sec, ask)
    redis.call('EXPIRE', KEYS[2], window + 1)
    ttotal = ttotal + ask
    toks[#toks + 1] = {sec, ask}
  end
  if budget >= 0 then
    spent = redis.call('INCRBY', KEYS[3], cost)
    if tonumber(ARGV[8]) > 0 then redis.call('EXPIRE', KEYS[3], ARGV[8]) end
  end
end
return {refusal, math.ceil(wait * 1000), sec, rtotal, math.ceil(reset_in(reqs) * 1000),
        ttotal, math.ceil(reset_in(toks) * 1000), spent}
"""

# Settling moves a reservation to the real usage; a bucket that has left the window, or
# a period that has ended, is left alone.
SETTLE = """
if ARGV[2] ~= '0' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) < 0 then
    redis.call('HSET', KEYS[1], ARGV[1], 0)
  end
end
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('INCRBY', KEYS[2], ARGV[3]) < 0 then
    redis.call('SET', KEYS[2], 0, 'KEEPTTL')
  end
end
return 1
"""

# A period's counter outlives the period by a day, for late settlements.
BUDGET_GRACE_S = 86_400
# Tokens asked are capped (a request's max_tokens and n are the client's to choose):
# far above any TPM, far below where Redis's integers end.
MAX_TOKENS = 10**12


def limit_keys(prefix: str, key_id: str, period_id: str) -> list[str]:
    """An API key's counters: request buckets, token buckets, the period's spend.

    Shared with the read-only usage view (app/ratelimit/usage.py), so both name them alike.
    """
    tag = f"{prefix}rl:{{{key_id}}}"
    return [f"{tag}:req", f"{tag}:tok", f"{tag}:usd:{period_id}"]


class RedisWindow:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._prefix = prefix
        self._reserve = redis.register_script(RESERVE)
        self._settle = redis.register_script(SETTLE)

    def _keys(self, key_id: str, period_id: str) -> list[str]:
        return limit_keys(self._prefix, key_id, period_id)

    async def reserve(self, quota: Quota, ask: Ask) -> tuple[Decision, float | None]:
        """The decision, and the period's spend in dollars (None without a budget)."""
        now = time.time()
        tokens_asked = min(ask.tokens, MAX_TOKENS)
        period_id, ends = period_of(quota.period, now)
        # -1: no budget (0 is a budget: nothing may be spent). A reservation never needs
        # more than the whole budget, and the cap keeps Redis's integers in range.
        budget = to_nano(quota.budget_usd) if quota.budget_usd is not None else -1
        cost = min(to_nano(ask.cost_usd), budget + 1) if budget >= 0 else 0
        until_end = max(1.0, ends - now) if ends is not None else 86_400.0
        ttl = round(until_end) + BUDGET_GRACE_S if ends is not None else 0
        args = (
            quota.rpm or 0,
            quota.tpm or 0,
            tokens_asked,
            budget,
            cost,
            f"{until_end:.3f}",
            WINDOW_S,
            ttl,
        )
        out = await self._reserve(keys=self._keys(quota.key_id, period_id), args=args)
        refusal = out[0].decode() if isinstance(out[0], bytes) else str(out[0])
        second, spent = int(out[2]), int(out[7])
        requests = tokens = None
        if quota.rpm:
            requests = Meter(quota.rpm, max(0, quota.rpm - int(out[3])), int(out[4]) / 1000)
        if quota.tpm:
            tokens = Meter(quota.tpm, max(0, quota.tpm - int(out[5])), int(out[6]) / 1000)
        spent_usd = spent / 1e9 if budget >= 0 else None
        if refusal:
            wait = None if refusal == "too_large" else int(out[1]) / 1000
            decision = Decision(False, refusal, wait, requests, tokens)  # type: ignore[arg-type]
            return decision, spent_usd
        ticket = Ticket(
            quota.key_id,
            second,
            tokens_asked,
            cost,
            period_id,
            local=False,
            counts_tokens=bool(quota.tpm),
            counts_cost=budget >= 0,
        )
        return Decision(True, None, None, requests, tokens, ticket), spent_usd

    async def settle(self, ticket: Ticket, token_delta: int, cost_delta: int) -> None:
        keys = self._keys(ticket.key_id, ticket.period_id or "total")
        await self._settle(keys=[keys[1], keys[2]], args=(ticket.second, token_delta, cost_delta))
