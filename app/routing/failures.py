"""What a failed attempt means for retrying, for the breaker and for the limiter."""

from __future__ import annotations

import enum
import re

from app.errors import GatewayError, UpstreamError, UpstreamStatusError, UpstreamTimeoutError

# How each provider says the prompt does not fit (their real error texts and codes).
_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length"}
_CONTEXT_TEXT = re.compile(
    r"maximum context length|context[_ ]length|context window|prompt is too long"
    r"|input is too long|exceeds the maximum number of tokens|too many tokens",
    re.IGNORECASE,
)


class Failure(enum.Enum):
    CLIENT = "client"  # the request's own fault: passed back, not retried, not counted
    CONTEXT = "context"  # the prompt does not fit: fall back to a larger window only
    DEADLINE = "deadline"  # the client's own deadline ran out: not the upstream's fault
    RATE_LIMITED = "rate_limited"  # 429: retry elsewhere or later; the limiter shrinks
    MISCONFIGURED = "misconfigured"  # 401/403/404 upstream: another deployment, not this
    UPSTREAM = "upstream"  # 408, 5xx, connection, timeout, broken answer: retry


def is_context_window_error(e: GatewayError) -> bool:
    if not isinstance(e, UpstreamStatusError) or e.upstream_status not in (400, 413, 422):
        return False
    return (e.code or "") in _CONTEXT_CODES or bool(_CONTEXT_TEXT.search(e.message))


def classify(e: GatewayError, *, client_deadline: bool) -> Failure:
    """`client_deadline`: the attempt's timeout was cut short by the request's deadline."""
    if isinstance(e, UpstreamTimeoutError):
        return Failure.DEADLINE if client_deadline else Failure.UPSTREAM
    if isinstance(e, UpstreamStatusError):
        status = e.upstream_status
        if status == 429:
            return Failure.RATE_LIMITED
        # 401/403/404 from an upstream are about the gateway's own key or configured
        # model, not the client's request: another deployment may answer, this one will
        # not (so it is not retried, but its breaker counts it).
        if status in (401, 403, 404):
            return Failure.MISCONFIGURED
        if status == 408 or status >= 500:
            return Failure.UPSTREAM
        return Failure.CONTEXT if is_context_window_error(e) else Failure.CLIENT
    if isinstance(e, UpstreamError):
        return Failure.UPSTREAM
    return Failure.CLIENT
