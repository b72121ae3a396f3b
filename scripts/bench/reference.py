"""The calibration reference: a bare FastAPI pass-through over aiohttp, no gateway logic.

The issue's targets were set on a machine where this very app served ~6,000 requests/s
at concurrency 16. The bench machine's speed varies by 2-3x from hour to hour (a shared
VM; see the steal figure), so the bench measures this app in the same run, against the
same nginx, and reports the gateway's throughput both as measured and scaled by how fast
the reference ran here: that scaled figure is comparable with the targets on any day.

Run as its own uvicorn process (`reference:app`, upstream URL in BENCH_UPSTREAM) with the
gateway's flags.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import Response

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "")
_session: list[aiohttp.ClientSession] = []


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    _session.append(aiohttp.ClientSession())
    yield
    await _session.pop().close()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    headers = {"content-type": "application/json"}
    async with _session[0].post(UPSTREAM, data=body, headers=headers) as resp:
        data = await resp.read()
    return Response(data, status_code=resp.status, media_type="application/json")
