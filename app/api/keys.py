"""Admin endpoints for virtual keys (master key only): create, list, read, update, revoke.

The secret is in the create answer and nowhere else, ever: the database keeps its hash.
With `?usage=true` the list and read answers add each key's use of its limits, read from
the limiter's Redis counters in one bounded round trip; a Redis that does not answer
makes that `null` (and says so in `usage_error`), never the whole answer an error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from redis.exceptions import RedisError

from app.auth.keys import KeyCreate, KeyLimits, key_json
from app.deps import AdminDep, StateDep
from app.errors import NotFoundError, ServiceUnavailableError
from app.ratelimit.quota import Quota
from app.ratelimit.usage import read_usage
from app.state import AppState
from app.store.db import DB_ERRORS
from app.store.schema import ApiKey

log = logging.getLogger("flywheel.auth")
router = APIRouter(prefix="/admin/keys", tags=["admin"], dependencies=[AdminDep])

KeyId = Annotated[str, Path(pattern=r"^key_[0-9a-f]{24}$")]
WithUsage = Annotated[
    bool, Query(description="add each key's use of its limits now (rpm, tpm, budget)")
]


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[None]:
    """A database that does not answer is a 503, not a 500."""
    try:
        yield
    except DB_ERRORS as e:
        raise ServiceUnavailableError(
            f"keys are unavailable: the database did not answer ({type(e).__name__})",
            code="database_unavailable",
        ) from e


def _found(row: ApiKey | None, key_id: str) -> ApiKey:
    if row is None:
        raise NotFoundError(f"no key {key_id}", param="id", code="key_not_found")
    return row


@router.post("", status_code=201)
async def create_key(state: StateDep, spec: Annotated[KeyCreate, Body()]) -> dict[str, Any]:
    async with _database():
        row, secret = await state.keys.store.create(spec)
    await _announce(state, row)  # a replica that cached "no such key" learns it now
    return {**key_json(row), "key": secret}


@router.get("")
async def list_keys(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
    usage: WithUsage = False,
) -> dict[str, Any]:
    async with _database():
        rows = await state.keys.store.list(limit=limit, after=after)
    data = [key_json(r) for r in rows]
    body: dict[str, Any] = {
        "object": "list",
        "data": data,
        "has_more": len(data) == limit,
        "last_id": data[-1]["id"] if data else None,
    }
    if usage:
        body["usage_error"] = await _add_usage(state, data)
    return body


@router.get("/{key_id}")
async def get_key(state: StateDep, key_id: KeyId, usage: WithUsage = False) -> dict[str, Any]:
    async with _database():
        row = await state.keys.store.get(key_id)
    body = key_json(_found(row, key_id))
    if usage:
        body["usage_error"] = await _add_usage(state, [body])
    return body


async def _add_usage(state: AppState, keys: list[dict[str, Any]]) -> str | None:
    """Set each key's `usage`; the error to report when Redis did not answer."""
    quotas = [Quota(k["id"], k["rpm"], k["tpm"], k["budget_usd"], k["budget_period"]) for k in keys]
    found = await read_usage(state.redis, state.settings.flywheel_redis_prefix, quotas)
    for k in keys:
        k["usage"] = None if found is None else found[k["id"]]
    return "redis_unavailable" if found is None else None


@router.patch("/{key_id}")
async def update_key(
    state: StateDep, key_id: KeyId, changes: Annotated[KeyLimits, Body()]
) -> dict[str, Any]:
    async with _database():
        row = await state.keys.store.update(key_id, changes)
    found = _found(row, key_id)
    await _announce(state, found)
    return key_json(found)


@router.delete("/{key_id}")
async def revoke_key(state: StateDep, key_id: KeyId) -> dict[str, Any]:
    async with _database():
        row = await state.keys.store.revoke(key_id)
    found = _found(row, key_id)
    await _announce(state, found)
    return key_json(found)


async def _announce(state: AppState, row: ApiKey) -> None:
    """Every replica drops what it knew of the key; the change is already stored, so a
    Redis that is down only delays it to the replicas' cache expiry (logged)."""
    try:
        await state.keys.announce(row.key_hash)
    except (RedisError, OSError) as e:
        state.keys.forget(row.key_hash)
        log.warning(
            "key change not announced (%s): other replicas see it within %.0f s",
            type(e).__name__,
            state.settings.flywheel_key_cache_s,
        )
