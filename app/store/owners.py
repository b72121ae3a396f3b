"""Who made each request, so feedback can be checked on the request path, where nothing
writes to the database.

Three tiers, each asked only when the one before has no answer:
1. this gateway's memory: the newest ids it recorded (a bounded map, in record order);
2. Redis: each recorder writes its shipped batch's ids, in the same pipeline as the
   batch, into one hash per time bucket (`{prefix}owners:{bucket}`), each bucket
   expiring `ttl_s` after its last write. So an id is known everywhere for at least
   `ttl_s`, memory is bounded by (`ttl_s` + one bucket) of requests, and a lookup is one
   round trip over the few buckets that can hold it. Entries are compact: the gateway's
   ids as their 12 bytes, owners as an 8-byte digest of the tenant (equality is all a
   check needs), about 66 bytes an id in Redis, half what the plain strings take;
3. the database: the `requests` row, once consolidated (a read, bounded by a timeout).

A tier that cannot answer (Redis or the database down) leaves the verdict undecided:
the feedback is accepted and the worker, which only applies scores to requests of the
same tenant (or given with the master key), decides.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.store.schema import RequestRow

log = logging.getLogger("flywheel.owners")

MASTER = "master"  # the master key's tenant: it may score any request
BUCKETS_PER_TTL = 4
CHAT_PREFIX = "chatcmpl-"
DIGESTS_KEPT = 4096


class Verdict(enum.Enum):
    OWNED = "owned"  # the caller's request (or the caller is the master key)
    FOREIGN = "foreign"  # another tenant's: answered as if unknown
    UNKNOWN = "unknown"  # no tier that could hold it knows it
    UNDECIDED = "undecided"  # a tier that could hold it did not answer


def digest(tenant: str) -> bytes:
    return hashlib.blake2b(tenant.encode(), digest_size=8).digest()


def field(request_id: str) -> bytes:
    """The id as the index keeps it: the gateway's own ids ("chatcmpl-" + 24 hex) as their
    12 bytes behind a NUL (no text id starts with one), 20 bytes less an id; any other
    id as it is."""
    if request_id.startswith(CHAT_PREFIX) and len(request_id) == len(CHAT_PREFIX) + 24:
        try:
            return b"\x00" + bytes.fromhex(request_id[len(CHAT_PREFIX) :])
        except ValueError:
            pass
    return request_id.encode()


class Owners:
    """The first two tiers: this process's recent ids, and the Redis index."""

    __slots__ = ("_capacity", "_digests", "_recent", "bucket_s", "prefix", "ttl_s")

    def __init__(self, prefix: str, ttl_s: float, capacity: int = 20_000) -> None:
        self.prefix = prefix  # the hashes are `{prefix}{bucket}`
        self.ttl_s = ttl_s
        self.bucket_s = ttl_s / BUCKETS_PER_TTL
        self._capacity = capacity
        # Oldest recorded id out first (feedback comes soon after its answer, so record
        # order is the order of usefulness). An OrderedDict, not a dict: popping a plain
        # dict's first key scans the holes its earlier pops left (O(n) at capacity).
        self._recent: OrderedDict[str, str] = OrderedDict()
        # Tenants repeat from batch to batch: their digests are worth keeping (bounded).
        self._digests: dict[str, bytes] = {}

    @classmethod
    def of(cls, settings: Settings) -> Owners:
        return cls(
            settings.flywheel_redis_prefix + "owners:", settings.flywheel_feedback_owner_ttl_s
        )

    def remember(self, request_id: str, tenant: str) -> None:
        recent = self._recent
        if len(recent) >= self._capacity:
            recent.popitem(last=False)
        recent[request_id] = tenant

    def local(self, request_id: str) -> str | None:
        return self._recent.get(request_id)

    def _bucket(self, now: float) -> int:
        return int(now // self.bucket_s)

    def add_to(self, pipe: Pipeline, owned: Iterable[tuple[str, str]]) -> None:
        """Queue the writes of (request id, tenant) pairs on the recorder's pipeline."""
        mapping = {field(rid): self._digest(tenant) for rid, tenant in owned}
        if not mapping:
            return
        key = f"{self.prefix}{self._bucket(time.time())}"
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, math.ceil(self.ttl_s))

    def _digest(self, tenant: str) -> bytes:
        found = self._digests.get(tenant)
        if found is None:
            if len(self._digests) >= DIGESTS_KEPT:
                self._digests.clear()
            found = self._digests[tenant] = digest(tenant)
        return found

    async def in_redis(self, redis: Redis, request_id: str) -> bytes | None:
        """The owner's digest from the buckets that can still hold the id (one round
        trip, newest first); None when none does."""
        newest = self._bucket(time.time())
        pipe = redis.pipeline(transaction=False)
        wanted: Any = field(request_id)  # bytes: redis takes them (its stubs say str)
        for bucket in range(newest, newest - BUCKETS_PER_TTL - 1, -1):
            pipe.hget(f"{self.prefix}{bucket}", wanted)
        found: list[Any] = await pipe.execute()
        return next((bytes(d) for d in found if d is not None), None)


@dataclass(frozen=True, slots=True)
class OwnerCheck:
    owners: Owners | None
    redis: Redis | None
    engine: AsyncEngine
    redis_timeout_s: float
    db_timeout_s: float

    async def check(self, request_id: str, tenant: str) -> Verdict:
        """Whether `tenant` may score the request `request_id`."""
        master = tenant == MASTER
        owner = None if self.owners is None else self.owners.local(request_id)
        if owner is not None:
            return Verdict.OWNED if master or owner == tenant else Verdict.FOREIGN
        read, indexed = await self._in_redis(request_id)
        if indexed is not None:
            return Verdict.OWNED if master or indexed == digest(tenant) else Verdict.FOREIGN
        try:
            async with asyncio.timeout(self.db_timeout_s):
                async with self.engine.connect() as conn:
                    query = select(RequestRow.tenant).where(RequestRow.id == request_id)
                    row = (await conn.execute(query)).first()
        except (TimeoutError, SQLAlchemyError, OSError) as e:
            log.info("feedback owner not checked in the database (%s)", type(e).__name__)
            return Verdict.UNDECIDED
        if row is None:
            # Unknown only if the index was read: else the request may be too recent.
            return Verdict.UNKNOWN if read else Verdict.UNDECIDED
        return Verdict.OWNED if master or row.tenant == tenant else Verdict.FOREIGN

    async def _in_redis(self, request_id: str) -> tuple[bool, bytes | None]:
        """Whether the index could be read (there is one, Redis answered in time), and
        the owner's digest it holds, if any."""
        if self.owners is None or self.redis is None:
            return False, None
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                return True, await self.owners.in_redis(self.redis, request_id)
        except (TimeoutError, RedisError, OSError) as e:
            log.info("feedback owner not checked in Redis (%s)", type(e).__name__)
            return False, None
