"""Cache keys: a SHA-256 of the normalised request, the route, the prompt variant, the tenant.

Normalising means parsing and re-serialising with sorted keys (so key order and
whitespace never split a key), dropping what does not change the answer (`user`,
`metadata`, `stream`, `stream_options`, `store`, `service_tier`) and spelling equal
values one way (`temperature: 1` and `1.0`; `max_tokens` and `max_completion_tokens`).
Everything else, including fields this gateway does not know, is part of the key: an
unknown parameter may change the output, and a miss is cheaper than a wrong answer.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import orjson

# Top-level fields that never change the answer.
IGNORED = frozenset(
    {"model", "user", "metadata", "stream", "stream_options", "store", "service_tier"}
)
FLOATS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
VERSION = "v1"


def normalised(body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in IGNORED}
    for name in FLOATS:
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    if "max_tokens" in out and "max_completion_tokens" not in out:
        out["max_completion_tokens"] = out.pop("max_tokens")
    return out


def cache_key(
    prefix: str,
    endpoint: str,
    route: str,
    body: dict[str, Any],
    *,
    tenant: str,
    variant: str | None = None,
) -> str:
    """`{prefix}cache:v1:{route}:{sha256}`; the route is in clear so a purge can find it."""
    material = {
        "endpoint": endpoint,
        "route": route,
        "tenant": tenant,
        "variant": variant,
        "body": normalised(body),
    }
    digest = hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}cache:{VERSION}:{route}:{digest}"


def route_pattern(prefix: str, route: str | None) -> str:
    """The SCAN pattern for every cached answer of `route` (all routes when None)."""
    if route is None:
        return f"{prefix}cache:{VERSION}:*"
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in route)
    # Exactly a digest after the route: not route `a:b`'s keys, not the fill locks.
    return f"{prefix}cache:{VERSION}:{escaped}:" + "?" * 64


@functools.lru_cache(maxsize=4096)
def tenant_of(authorization: str | None) -> str:
    """The tenant of a caller without a virtual key (where keys are optional): the bearer
    token it presented, hashed, so answers never cross callers. Virtual keys are their
    own tenants (`key:<id>`), the master key is `master`."""
    if not authorization:
        return "anonymous"
    return hashlib.sha256(authorization.encode()).hexdigest()[:32]
