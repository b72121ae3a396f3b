"""A cached answer, ready to serve: its JSON split around the completion id.

Each hit is a new completion with its own id (the request id, which feedback and the
request log use), so the JSON is kept as the bytes before and after the id: serving an
L1 hit is a concatenation, not a serialisation. In Redis the answer is stored as JSON,
compressed when large.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

_ID_MARK = "flywheel-completion-id-0c5f6e"
_ID_BYTES = orjson.dumps(_ID_MARK)
RAW, ZLIB = b"j", b"z"
# Above this many bytes, (de)compressing and (de)serialising go to a worker thread, so a
# large answer (a batch of embeddings) never holds the event loop for milliseconds.
OFF_LOOP_BYTES = 256 * 1024


class CorruptEntry(ValueError):
    """An L2 value this version cannot read (written by another version, or damaged)."""


@dataclass(frozen=True, slots=True)
class Cached:
    kind: str  # "chat" or "embeddings"
    route: str
    answer: dict[str, Any]
    head: bytes
    tail: bytes

    @classmethod
    def of(cls, kind: str, route: str, answer: dict[str, Any]) -> Cached:
        if kind != "chat":
            return cls(kind, route, answer, orjson.dumps(answer), b"")
        # "id" first, so the first mark in the bytes is the id, whatever the content says.
        marked = {"id": _ID_MARK, **{k: v for k, v in answer.items() if k != "id"}}
        head, _, tail = orjson.dumps(marked).partition(_ID_BYTES)
        return cls(kind, route, answer, head, tail)

    @property
    def size(self) -> int:
        """Bytes it holds, roughly: the serialised form twice (bytes and the parsed dict)."""
        return 2 * (len(self.head) + len(self.tail)) + 200

    def json_body(self, request_id: str) -> bytes:
        if self.kind != "chat":
            return self.head
        return self.head + orjson.dumps(request_id) + self.tail

    def encode(self, compress_min_bytes: int) -> bytes:
        raw = orjson.dumps({"kind": self.kind, "route": self.route, "answer": self.answer})
        if len(raw) >= compress_min_bytes:
            return ZLIB + zlib.compress(raw, 1)
        return RAW + raw

    @classmethod
    def decode(cls, value: bytes) -> Cached:
        try:
            tag, payload = value[:1], value[1:]
            if tag == ZLIB:
                payload = zlib.decompress(payload)
            elif tag != RAW:
                raise CorruptEntry(f"unknown tag {tag!r}")
            data = orjson.loads(payload)
            return cls.of(str(data["kind"]), str(data["route"]), dict(data["answer"]))
        except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CorruptEntry(str(e)) from e


async def encode(cached: Cached, compress_min_bytes: int) -> bytes:
    if cached.size > 2 * OFF_LOOP_BYTES:
        return await asyncio.to_thread(cached.encode, compress_min_bytes)
    return cached.encode(compress_min_bytes)


async def decode(value: bytes) -> Cached:
    if len(value) > OFF_LOOP_BYTES // 8:  # compressed: the answer may be ~8x larger
        return await asyncio.to_thread(Cached.decode, value)
    return Cached.decode(value)
