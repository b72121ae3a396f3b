"""Admission: a key's limits checked, and its reservation made, before any work is done.

For a virtual key: the endpoint's default per-key limit (slowapi, in this process) when
the key has no RPM of its own, then the key's RPM, TPM and budget reserved in one
atomic Redis call (`app.ratelimit`). The reservation is settled with the real usage when
the exchange is recorded. The master key and anonymous callers (where keys are
optional) are held by the per-address limit only.
"""

from __future__ import annotations

from typing import Any

from app.api.auth import Caller
from app.api.exchange import Exchange
from app.errors import GatewayError, RateLimitError, ServiceUnavailableError
from app.ratelimit.headers import meter_headers, retry_headers
from app.ratelimit.limiter import OnRedisDown
from app.ratelimit.quota import Ask, Decision, Quota
from app.state import AppState


async def admit(
    state: AppState, exchange: Exchange, caller: Caller, route: str, body: dict[str, Any]
) -> None:
    """Raises 429 (or 503 where a route fails closed without Redis) when refused."""
    key = caller.key
    if exchange.admitted or key is None:
        return
    exchange.admitted = True
    requests = None
    if key.rpm is None:
        requests = state.http_limits.check_key(exchange.endpoint, key.id)
    quota = Quota(key.id, key.rpm, key.tpm, key.budget_usd, key.budget_period)
    if quota.empty:
        exchange.rate_headers = meter_headers(requests, None)
        return
    ask = await _ask(state, quota, route, body)
    decision = await state.limiter.reserve(quota, ask, _on_redis_down(state, route))
    exchange.rate_headers = meter_headers(decision.requests or requests, decision.tokens)
    if not decision.allowed:
        raise _refusal(decision, quota, ask)
    exchange.ticket = decision.ticket
    exchange.limiter = state.limiter


def _on_redis_down(state: AppState, route: str) -> OnRedisDown:
    config = state.router.routes.get(route)
    if config is not None and config.limits is not None and config.limits.on_redis_down:
        return config.limits.on_redis_down
    return state.settings.flywheel_limits_on_redis_down


async def _ask(state: AppState, quota: Quota, route: str, body: dict[str, Any]) -> Ask:
    if quota.tpm is None and quota.budget_usd is None:
        return Ask(0, 0.0)  # requests only: nothing to count
    prompt = await state.tokens.prompt_tokens(body)
    completion = _completion_allowance(state, body)
    price_in, price_out = _dearest_prices(state, route)
    cost = (prompt * price_in + completion * price_out) / 1000
    return Ask(prompt + completion, cost)


def _completion_allowance(state: AppState, body: dict[str, Any]) -> int:
    if "messages" not in body:
        return 0  # embeddings answer with vectors, not tokens
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        limit = state.settings.flywheel_limit_completion_tokens
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return limit * choices


def _dearest_prices(state: AppState, route: str) -> tuple[float, float]:
    """Per 1k tokens, at the route's dearest deployment (an ensemble: its members summed):
    the reservation must not be short whichever deployment answers."""
    config = state.router.routes.get(route)
    if config is None:
        return 0.0, 0.0
    if config.ensemble is not None:
        members = [_dearest_prices(state, m) for m in config.ensemble.members if m != route]
        return sum(p[0] for p in members), sum(p[1] for p in members)
    if not config.deployments:
        return 0.0, 0.0
    return (
        max(d.input_cost_per_1k for d in config.deployments),
        max(d.output_cost_per_1k for d in config.deployments),
    )


def _refusal(decision: Decision, quota: Quota, ask: Ask) -> GatewayError:
    wait = decision.retry_after_s
    error: GatewayError
    if decision.refusal == "requests":
        error = RateLimitError(
            f"Rate limit reached for requests per min (RPM): limit {quota.rpm}. "
            f"Try again in {wait or 0:.1f}s.",
            code="rate_limit_exceeded",
        )
    elif decision.refusal == "tokens":
        error = RateLimitError(
            f"Rate limit reached for tokens per min (TPM): limit {quota.tpm}, requested "
            f"{ask.tokens}. Try again in {wait or 0:.1f}s.",
            code="rate_limit_exceeded",
        )
    elif decision.refusal == "too_large":
        error = RateLimitError(
            f"Request too large for this key's tokens per min (TPM): limit {quota.tpm}, "
            f"requested {ask.tokens} (prompt plus max_tokens). Reduce the input or "
            "max_tokens.",
            code="rate_limit_exceeded",
        )
    elif decision.refusal == "budget":
        error = RateLimitError(
            f"You exceeded your current quota: this key's budget of ${quota.budget_usd:g} "
            f"({quota.period or 'total'}) is spent.",
            code="insufficient_quota",
        )
        error.type = "insufficient_quota"
    else:
        error = ServiceUnavailableError(
            "Rate limits cannot be checked right now and this route does not admit "
            "requests without them; try again shortly.",
            code="rate_limits_unavailable",
        )
    if wait is not None:
        error.headers.update(retry_headers(wait))
    return error
