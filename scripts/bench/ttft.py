"""Time to first token: sequential streaming requests from one keep-alive aiohttp client.

TTFT is the time from sending the request to reading the first `data:` line whose
chunk carries content (`choices[0].delta.content` non-empty); the rest of the stream
is then drained so the connection is reused for the next request.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass

import aiohttp

from bench.body import ChatBody

HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}


@dataclass(frozen=True)
class TtftResult:
    samples: int
    median_ms: float
    p99_ms: float


def _has_content(line: bytes) -> bool:
    if not line.startswith(b"data:"):
        return False
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return False
    chunk = json.loads(payload)
    choices = chunk.get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    start = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=body, headers=HEADERS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"TTFT probe: {url} answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if first is None and _has_content(line):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"TTFT probe: no content chunk in the stream from {url}")
    return first * 1000


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


async def _probe(url: str, body: ChatBody, requests: int, warmup: int) -> TtftResult:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for n in range(warmup):
            await _one(session, url, body.numbered(-1 - n).encode())
        samples = [await _one(session, url, body.numbered(n).encode()) for n in range(requests)]
    return TtftResult(len(samples), statistics.median(samples), percentile(samples, 99))


def measure(url: str, body: ChatBody, *, requests: int = 300, warmup: int = 20) -> TtftResult:
    """Run the probe on a fresh event loop (the bench itself is synchronous)."""
    return asyncio.run(_probe(url, body, requests, warmup))
