"""The rate-limit headers OpenAI sends, so SDKs and clients read ours the same way."""

from __future__ import annotations

import math

from app.ratelimit.quota import Meter


def duration(seconds: float) -> str:
    """OpenAI's spelling of a reset time: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def meter_headers(requests: Meter | None, tokens: Meter | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, meter in (("requests", requests), ("tokens", tokens)):
        if meter is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(meter.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(meter.remaining)
            out[f"x-ratelimit-reset-{kind}"] = duration(meter.reset_s)
    return out


def retry_headers(wait_s: float) -> dict[str, str]:
    """`Retry-After` in whole seconds, never 0 (read as "now"), and `retry-after-ms`,
    which OpenAI's SDKs prefer when present."""
    return {
        "retry-after": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(max(0, math.ceil(wait_s * 1000))),
    }
