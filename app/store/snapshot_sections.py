"""What a snapshot holds: named sections of the learned state in Redis.

Each section says which keys it covers, how to read them (`dump`) and how to write them
back (`plan`: the Redis commands a restore will send, built without touching Redis, so
a section that cannot be read back fails the restore before anything is written). Keys
are stored relative to the installation's prefix, so a snapshot restores under another
prefix too. A later capability adds its state by adding one entry to `SECTIONS`.

Expiry is kept as an absolute time: a restored key expires when the original would
have, and one whose time has passed by then is not restored at all.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis

SCAN_COUNT = 1000
BATCH = 500
# The cache's sorted set of hit counts per key (`L2Cache.hot_key`, relative to the prefix).
CACHE_HOT = "cache:hot"

Command = tuple[str | bytes | int | float, ...]


@dataclass(frozen=True, slots=True)
class DumpContext:
    prefix: str
    now_ms: int
    cache_entries: int


@dataclass(slots=True)
class Plan:
    """The commands restoring one section, and how many items it writes or skips."""

    commands: list[Command] = field(default_factory=list)
    written: int = 0
    expired: int = 0


class Section(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def probes(self) -> tuple[str, ...]:
        """Key patterns (relative to the prefix): any match means Redis holds this state."""
        ...

    async def dump(self, redis: Redis, ctx: DumpContext) -> list[dict[str, Any]]: ...

    def plan(self, prefix: str, items: list[dict[str, Any]], now_ms: int) -> Plan:
        """Raises ValueError, KeyError or TypeError on an item it cannot read back."""
        ...


# -- bytes in JSON ------------------------------------------------------------------------


def encoding_for(values: Iterable[bytes]) -> str:
    """ "utf8" when every value is text (readable in the file), else "base64"."""
    try:
        for v in values:
            v.decode()
    except UnicodeDecodeError:
        return "base64"
    return "utf8"


def to_text(value: bytes, enc: str) -> str:
    return value.decode() if enc == "utf8" else base64.b64encode(value).decode()


def from_text(value: object, enc: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {type(value).__name__}")
    if enc == "utf8":
        return value.encode()
    if enc == "base64":
        return base64.b64decode(value, validate=True)
    raise ValueError(f"unknown encoding {enc!r}")


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _left_ms(item: dict[str, Any], now_ms: int) -> int | None:
    """Milliseconds the item has left (None: no expiry); <= 0 means it has expired."""
    expires = item.get("expires_at_ms")
    if expires is None:
        return None
    if not isinstance(expires, int):
        raise TypeError("expires_at_ms must be an integer")
    return expires - now_ms


# -- any keys under a pattern -------------------------------------------------------------


async def _keys(redis: Redis, prefix: str, pattern: str) -> list[str]:
    if not any(c in pattern for c in "*?["):  # one exact key: no need to scan
        exists = await redis.exists(prefix + pattern)
        return [prefix + pattern] if exists else []
    match = glob_escape(prefix) + pattern
    found = {k.decode() async for k in redis.scan_iter(match=match, count=SCAN_COUNT)}
    return sorted(found)


async def _values(redis: Redis, keys: Sequence[str], kinds: Sequence[bytes]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, kinds, strict=True):
            if kind == b"string":
                pipe.get(key)
            elif kind == b"hash":
                pipe.hgetall(key)
            elif kind == b"list":
                pipe.lrange(key, 0, -1)
            elif kind == b"set":
                pipe.smembers(key)
            elif kind == b"zset":
                pipe.zrange(key, 0, -1, withscores=True)
            else:  # gone meanwhile, or a type no section stores (streams)
                pipe.exists(key)
        result: list[Any] = await pipe.execute()
    return result


def _item(rel: str, kind: str, value: Any, left_ms: int, now_ms: int) -> dict[str, Any] | None:
    expires = None if left_ms < 0 else now_ms + left_ms
    if kind == "string":
        enc = encoding_for([value])
        data: Any = to_text(value, enc)
    elif kind == "hash":
        enc = encoding_for([*value.keys(), *value.values()])
        data = {to_text(k, enc): to_text(v, enc) for k, v in sorted(value.items())}
    elif kind in ("list", "set"):
        members = value if kind == "list" else sorted(value)
        enc = encoding_for(members)
        data = [to_text(m, enc) for m in members]
    elif kind == "zset":
        enc = encoding_for(m for m, _ in value)
        data = [[to_text(m, enc), score] for m, score in value]
    else:
        return None
    return {"key": rel, "type": kind, "enc": enc, "value": data, "expires_at_ms": expires}


@dataclass(frozen=True, slots=True)
class KeysSection:
    """Every key matching `pattern` (relative to the prefix), of any plain Redis type."""

    name: str
    pattern: str
    # Whether its keys prove Redis still holds the learned state. Not for state gateways
    # write back within seconds of a Redis restart (breaker cooldowns, cache hits):
    # those would hide that the learned state is gone and stop the warm-up.
    learned: bool = True

    @property
    def probes(self) -> tuple[str, ...]:
        return (self.pattern,) if self.learned else ()

    async def dump(self, redis: Redis, ctx: DumpContext) -> list[dict[str, Any]]:
        keys = await _keys(redis, ctx.prefix, self.pattern)
        items: list[dict[str, Any]] = []
        for start in range(0, len(keys), BATCH):
            batch = keys[start : start + BATCH]
            async with redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.type(key)
                    pipe.pttl(key)
                flat = await pipe.execute()
            kinds, ttls = flat[0::2], flat[1::2]
            values = await _values(redis, batch, kinds)
            for key, kind, ttl, value in zip(batch, kinds, ttls, values, strict=True):
                if value is None or ttl == -2 or (kind != b"string" and not value):
                    continue  # expired between the calls (an empty hash is no hash)
                rel = key[len(ctx.prefix) :]
                item = _item(rel, kind.decode(), value, int(ttl), ctx.now_ms)
                if item is not None:
                    items.append(item)
        return items

    def plan(self, prefix: str, items: list[dict[str, Any]], now_ms: int) -> Plan:
        plan = Plan()
        for item in items:
            left = _left_ms(item, now_ms)
            if left is not None and left <= 0:
                plan.expired += 1
                continue
            key = _key(prefix, item)
            plan.commands.append(("DEL", key))
            plan.commands.append(_write(key, item))
            if left is not None:
                plan.commands.append(("PEXPIRE", key, left))
            plan.written += 1
        return plan


def _key(prefix: str, item: dict[str, Any]) -> str:
    key = item["key"]
    if not isinstance(key, str) or not key:
        raise TypeError("an item's key must be a non-empty string")
    return prefix + key


def _write(key: str, item: dict[str, Any]) -> Command:
    kind, enc, value = item["type"], item["enc"], item["value"]
    if kind == "string":
        return ("SET", key, from_text(value, enc))
    if kind == "hash":
        if not isinstance(value, dict) or not value:
            raise TypeError(f"{key}: a hash needs fields")
        pairs = [b for f, v in value.items() for b in (from_text(f, enc), from_text(v, enc))]
        return ("HSET", key, *pairs)
    if kind in ("list", "set"):
        if not isinstance(value, list) or not value:
            raise TypeError(f"{key}: a {kind} needs members")
        return ("RPUSH" if kind == "list" else "SADD", key, *(from_text(m, enc) for m in value))
    if kind == "zset":
        if not isinstance(value, list) or not value:
            raise TypeError(f"{key}: a sorted set needs members")
        scored: list[float | bytes] = []
        for member, score in value:
            scored += [float(score), from_text(member, enc)]
        return ("ZADD", key, *scored)
    raise ValueError(f"{key}: unknown type {kind!r}")


# -- the hottest cache entries ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheSection:
    """The most-hit cached answers with their hit counts, so a restored cache pre-warms."""

    name: str = "cache"

    @property
    def probes(self) -> tuple[str, ...]:
        return ()  # gateways rewrite the hot-key set within seconds: no proof of anything

    async def dump(self, redis: Redis, ctx: DumpContext) -> list[dict[str, Any]]:
        if ctx.cache_entries <= 0:
            return []
        hot = await redis.zrevrange(
            ctx.prefix + CACHE_HOT, 0, ctx.cache_entries - 1, withscores=True
        )
        items: list[dict[str, Any]] = []
        mine = ctx.prefix.encode()
        for start in range(0, len(hot), BATCH):
            batch = [(k, s) for k, s in hot[start : start + BATCH] if k.startswith(mine)]
            async with redis.pipeline(transaction=False) as pipe:
                for key, _ in batch:
                    pipe.get(key)
                    pipe.pttl(key)
                flat = await pipe.execute()
            for (key, hits), value, ttl in zip(batch, flat[0::2], flat[1::2], strict=True):
                if value is None or ttl == -2:
                    continue  # expired or purged since it was last hit
                enc = encoding_for([value])
                items.append(
                    {
                        "key": key.decode()[len(ctx.prefix) :],
                        "enc": enc,
                        "value": to_text(value, enc),
                        "expires_at_ms": None if ttl < 0 else ctx.now_ms + int(ttl),
                        "hits": hits,
                    }
                )
        return items

    def plan(self, prefix: str, items: list[dict[str, Any]], now_ms: int) -> Plan:
        plan = Plan()
        hot: list[bytes | float] = []
        for item in items:
            left = _left_ms(item, now_ms)
            if left is not None and left <= 0:
                plan.expired += 1
                continue
            key = _key(prefix, item)
            value = from_text(item["value"], item["enc"])
            plan.commands.append(
                ("SET", key, value) if left is None else ("SET", key, value, "PX", left)
            )
            hot += [float(item["hits"]), key.encode()]
            plan.written += 1
        if hot:
            plan.commands.append(("ZADD", prefix + CACHE_HOT, *hot))
        return plan


# The learned state, by section name. Breaker cooldowns are what the gateways publish
# (`app.routing.weights`); the virtuous cycle keeps its state under `cycle:`, and a
# section of its own for part of that state should narrow this one's pattern.
SECTIONS: tuple[Section, ...] = (
    KeysSection("routing_weights", "weights:*"),
    KeysSection("breakers", "breakers", learned=False),
    KeysSection("cycle", "cycle:*"),
    CacheSection(),
)
