"""Rate-limit hints in upstream response headers, read before the upstream says 429.

OpenAI-style: `x-ratelimit-remaining-requests|tokens` with `x-ratelimit-reset-…` as a
duration ("1s", "6m0s", "20ms"); Anthropic: `anthropic-ratelimit-requests|tokens-
remaining` with `…-reset` as an RFC 3339 time. A remaining count of zero means: no new
request to this deployment until the reset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_PAUSE_S = 300.0


def parse_duration(text: str) -> float | None:
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        try:
            return float(text)
        except ValueError:
            return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _until(text: str, now: datetime) -> float | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when - now).total_seconds()


def pause_for(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to hold new requests, when a limit is exhausted; None when it is not."""
    waits: list[float] = []
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is not None and remaining.strip() == "0":
            wait = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", "1s"))
            waits.append(1.0 if wait is None else wait)
        remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
        if remaining is not None and remaining.strip() == "0":
            reset = headers.get(f"anthropic-ratelimit-{kind}-reset", "")
            wait = _until(reset, now or datetime.now(UTC))
            waits.append(1.0 if wait is None else wait)
    if not waits:
        return None
    return min(max(waits), MAX_PAUSE_S)
