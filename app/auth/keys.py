"""Virtual keys in the database: create (the secret is shown once), list, update, revoke.

Only a SHA-256 of the secret is stored, with a short display prefix so operators can tell
keys apart. Secrets are 256 random bits, so a fast hash is enough (nothing to brute
force) and lets a gateway look a presented key up by its hash.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from app.schemas.storable import StorableText, storable_json, storable_time
from app.store.schema import ApiKey

SECRET_PREFIX = "fw-"  # noqa: S105 - a marker that makes leaked keys findable, not a secret
DISPLAY_CHARS = 10
Period = Literal["day", "week", "month", "total"]
INT32_MAX = 2**31 - 1


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@functools.lru_cache(maxsize=4096)
def hash_key(secret: str) -> str:
    # Cached: it runs on every authenticated request, and the same few keys recur (the
    # cache's tenant hash keeps presented keys in memory the same way).
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyLimits(BaseModel):
    """What an operator sets on a key; every field optional on update."""

    model_config = ConfigDict(extra="forbid")

    name: StorableText | None = Field(default=None, min_length=1, max_length=200)
    allowed_routes: list[StorableText] | None = None
    # The database stores them in 32-bit integer columns.
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    budget_period: Period | None = None
    expires_at: Annotated[datetime | None, AfterValidator(storable_time)] = None
    metadata: Annotated[dict[str, Any] | None, AfterValidator(storable_json)] = None


class KeyCreate(KeyLimits):
    name: StorableText = Field(min_length=1, max_length=200)


def key_json(row: ApiKey) -> dict[str, Any]:
    """A key as the admin API shows it: never the secret, never its hash."""

    def ts(value: datetime | None) -> int | None:
        if value is None:
            return None
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(aware.timestamp())

    return {
        "object": "api_key",
        "id": row.id,
        "name": row.name,
        "display_prefix": row.display_prefix,
        "allowed_routes": row.allowed_routes,
        "rpm": row.rpm,
        "tpm": row.tpm,
        "budget_usd": row.budget_usd,
        "budget_period": row.budget_period,
        "expires_at": ts(row.expires_at),
        "metadata": row.key_metadata or {},
        "created_at": ts(row.created_at),
        "updated_at": ts(row.updated_at),
        "revoked_at": ts(row.revoked_at),
        "active": row.revoked_at is None,
    }


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        # Rows are handed out detached, as plain values: nothing lazy-loads later.
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def create(self, spec: KeyCreate) -> tuple[ApiKey, str]:
        secret = new_secret()
        now = datetime.now(UTC)
        period = spec.budget_period or ("total" if spec.budget_usd is not None else None)
        row = ApiKey(
            id="key_" + secrets.token_hex(12),
            name=spec.name,
            key_hash=hash_key(secret),
            display_prefix=secret[:DISPLAY_CHARS],
            allowed_routes=spec.allowed_routes,
            rpm=spec.rpm,
            tpm=spec.tpm,
            budget_usd=spec.budget_usd,
            budget_period=period,
            expires_at=spec.expires_at,
            key_metadata=spec.metadata,
            created_at=now,
            updated_at=now,
            revoked_at=None,
        )
        async with self._sessions.begin() as session:
            session.add(row)
        return row, secret

    async def list(self, *, limit: int, after: str | None = None) -> list[ApiKey]:
        """Keys by id, a page at a time (`after`: the last id of the previous page)."""
        query = select(ApiKey).order_by(ApiKey.id).limit(limit)
        if after is not None:
            query = query.where(ApiKey.id > after)
        async with self._sessions() as session:
            return list((await session.scalars(query)).all())

    async def get(self, key_id: str) -> ApiKey | None:
        async with self._sessions() as session:
            return await session.get(ApiKey, key_id)

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        async with self._sessions() as session:
            return await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))

    async def update(self, key_id: str, changes: KeyLimits) -> ApiKey | None:
        values = changes.model_dump(exclude_unset=True)
        if "metadata" in values:
            values["key_metadata"] = values.pop("metadata")
        async with self._sessions.begin() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                return None
            for name, value in values.items():
                setattr(row, name, value)
            row.updated_at = datetime.now(UTC)
        return row

    async def revoke(self, key_id: str) -> ApiKey | None:
        async with self._sessions.begin() as session:
            row = await session.get(ApiKey, key_id)
            if row is None:
                return None
            if row.revoked_at is None:  # revoking twice keeps the first time
                row.revoked_at = row.updated_at = datetime.now(UTC)
        return row
