"""Request records: built on the request path, shipped to a Redis stream off it.

`Recorder.record` only puts the record on a bounded in-process queue; a background task
appends batches to the stream, which workers consolidate into the database. When Redis
is down the queue holds what it can and the oldest records are dropped (and counted),
so a Redis outage never slows or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("flywheel.records")

STREAM_MAXLEN = 200_000


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    route: str | None
    deployment: str | None
    provider: str | None
    model: str | None
    status: int
    stream: bool
    started_at: float
    latency_ms: float
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    finish_reason: str | None = None
    error_code: str | None = None
    client_disconnected: bool = False
    usage_estimated: bool = False
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder:
    def __init__(self, redis: Redis | None, stream_key: str, *, capacity: int = 10_000):
        self._redis = redis
        self._stream = stream_key
        self._queue: asyncio.Queue[RequestRecord] = asyncio.Queue(maxsize=capacity)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.shipped = 0

    def record(self, rec: RequestRecord) -> None:
        if self._redis is None:
            # No Redis configured at all: there is nowhere to ship to, so keep nothing.
            self.dropped += 1
            return
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self._queue.task_done()
            self.dropped += 1
        self._queue.put_nowait(rec)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._redis is not None and self._task is None:
            self._task = asyncio.create_task(self._ship_forever(), name="flywheel-recorder")

    async def stop(self, drain_timeout_s: float = 2.0) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), drain_timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _drain(self) -> None:
        await self._queue.join()

    async def _ship_forever(self) -> None:
        assert self._redis is not None
        backoff = 0.1
        while True:
            batch = [await self._queue.get()]
            while len(batch) < 500 and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for rec in batch:
                        pipe.xadd(
                            self._stream,
                            {"data": orjson.dumps(asdict(rec))},
                            maxlen=STREAM_MAXLEN,
                            approximate=True,
                        )
                    await pipe.execute()
                self.shipped += len(batch)
                backoff = 0.1
            except (RedisError, OSError) as e:
                log.warning("request records not shipped (%s); keeping them", type(e).__name__)
                for rec in batch:
                    self.record(rec)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                for _ in batch:
                    self._queue.task_done()
