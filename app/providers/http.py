"""The upstream HTTP transport shared by the adapters.

One aiohttp session per process, with explicit pool limits and separate connect and read
timeouts. aiohttp was chosen by measurement: the issue's calibration (and `make bench`)
show httpx's default pool collapsing under concurrency while aiohttp holds up.
Transport exceptions are translated here, so adapters only see `app.errors` types.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from yarl import URL

from app.errors import (
    GatewayError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    sanitise,
)

JSON = dict[str, Any]
# Pulls (message, code, param) out of a provider's error body.
ErrorReader = Callable[[Any], tuple[str | None, str | None, str | None]]
HeaderHook = Callable[[Mapping[str, str]], None]


@functools.lru_cache(maxsize=1024)
def upstream_url(base: str, path: str) -> URL:
    """The parsed URL of an upstream endpoint. Bases come only from the routes file, so
    the cache is bounded by the configuration; parsing on every request showed up in
    profiles."""
    return URL(base.rstrip("/") + path)


def make_session(
    *,
    max_connections: int,
    connect_timeout_s: float,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=60,
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        raise_for_status=False,
        auto_decompress=True,
        trust_env=False,
        trace_configs=trace_configs or None,
    )


def openai_error_reader(body: Any) -> tuple[str | None, str | None, str | None]:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return (
            _str_or_none(err.get("message")),
            _str_or_none(err.get("code")) or _str_or_none(err.get("type")),
            _str_or_none(err.get("param")),
        )
    if isinstance(err, str):
        return err, None, None
    return None, None, None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` (seconds or an HTTP date), or OpenAI's `retry-after-ms`."""
    if ms := headers.get("retry-after-ms"):
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


async def status_error(
    resp: aiohttp.ClientResponse, reader: ErrorReader, secret: str
) -> UpstreamStatusError:
    raw = await resp.read()
    try:
        message, code, param = reader(orjson.loads(raw))
    except orjson.JSONDecodeError:
        message, code, param = None, None, None
    text = message or raw.decode("utf-8", "replace")[:500] or resp.reason or "upstream error"
    return UpstreamStatusError(
        resp.status,
        sanitise(f"upstream returned {resp.status}: {text}", secret),
        code=code,
        param=param,
        retry_after=retry_after_seconds(resp.headers),
    )


def transport_error(exc: BaseException, secret: str) -> GatewayError:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeoutError("upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamError(
            "upstream connection closed before the answer was complete",
            code="stream_interrupted",
        )
    return UpstreamError(sanitise(f"cannot reach upstream: {type(exc).__name__}", secret))


class _Post:
    """POST JSON; the response if it succeeded, every failure as an `app.errors` type.

    `on_headers` sees every response's headers (rate-limit hints pace the deployment).
    A class rather than `@asynccontextmanager`: this is on every request, and the
    generator-based form cost measurably more.
    """

    __slots__ = ("_ctx", "_on_headers", "_reader", "_secret")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        body: JSON,
        timeout_s: float,
        stream: bool,
        reader: ErrorReader,
        secret: str,
        on_headers: HeaderHook | None = None,
    ) -> None:
        # A per-request timeout replaces the session's whole: keep its connect bound.
        # A JSON answer must be whole within `timeout_s`; a stream, each wait for data.
        connect = session.timeout.sock_connect
        limits = (
            aiohttp.ClientTimeout(
                total=None, connect=timeout_s, sock_connect=connect, sock_read=timeout_s
            )
            if stream
            else aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect)
        )
        self._ctx = session.post(
            url,
            data=orjson.dumps(body),
            headers={**headers, "content-type": "application/json"},
            timeout=limits,
        )
        self._reader = reader
        self._secret = secret
        self._on_headers = on_headers

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            resp = await self._ctx.__aenter__()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise transport_error(e, self._secret) from e
        try:
            if self._on_headers is not None:
                self._on_headers(resp.headers)
            if resp.status >= 400:
                raise await status_error(resp, self._reader, self._secret)
        except BaseException:
            await self._ctx.__aexit__(None, None, None)
            raise
        return resp

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._ctx.__aexit__(kind, exc, tb)
        if isinstance(exc, (TimeoutError, aiohttp.ClientError)) and not isinstance(
            exc, GatewayError
        ):
            raise transport_error(exc, self._secret) from exc


async def post_json(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    headers: Mapping[str, str],
    body: JSON,
    timeout_s: float,
    reader: ErrorReader,
    secret: str,
    on_headers: HeaderHook | None = None,
) -> JSON:
    async with _Post(
        session,
        url,
        headers=headers,
        body=body,
        timeout_s=timeout_s,
        stream=False,
        reader=reader,
        secret=secret,
        on_headers=on_headers,
    ) as resp:
        raw = await resp.read()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise UpstreamError("upstream answered with invalid JSON") from e
    if not isinstance(parsed, dict):
        raise UpstreamError("upstream answered with an unexpected JSON value")
    return parsed


async def stream_lines(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    headers: Mapping[str, str],
    body: JSON,
    timeout_s: float,
    reader: ErrorReader,
    secret: str,
    on_headers: HeaderHook | None = None,
) -> AsyncGenerator[list[bytes], None]:
    """POST and yield the response's lines, in lists of those that arrived together.

    Reading whatever has arrived and splitting it here costs one await per network read
    instead of one per line; the timeout bounds each wait for data.
    """
    async with _Post(
        session,
        url,
        headers=headers,
        body=body,
        timeout_s=timeout_s,
        stream=True,
        reader=reader,
        secret=secret,
        on_headers=on_headers,
    ) as resp:
        pending = b""
        async for block in resp.content.iter_any():
            *lines, pending = (pending + block).split(b"\n")
            if lines:
                yield lines
        if pending:
            yield [pending]


async def sse_data(
    blocks: AsyncIterator[list[bytes]],
) -> AsyncGenerator[tuple[str, bytes], None]:
    """(event name, data) of each server-sent event; comments and keep-alives skipped."""
    event = ""
    data: list[bytes] = []
    async for lines in blocks:
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    yield event, b"\n".join(data)
                event, data = "", []
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
    if data:
        yield event, b"\n".join(data)


def parse_event(data: bytes) -> JSON:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise UpstreamError("upstream sent a malformed stream chunk") from e
    if not isinstance(parsed, dict):
        raise UpstreamError("upstream sent an unexpected stream chunk")
    return parsed


@asynccontextmanager
async def open_sse(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    headers: Mapping[str, str],
    body: JSON,
    timeout_s: float,
    reader: ErrorReader,
    secret: str,
    on_headers: HeaderHook | None = None,
) -> AsyncIterator[AsyncIterator[tuple[str, bytes]]]:
    """POST and give the (event, data) pairs of the server-sent events that come back.

    Both generators are closed on leaving the block, so the upstream connection is
    released as soon as the answer ends or the consumer goes away, not at GC time.
    """
    lines = stream_lines(
        session,
        url,
        headers=headers,
        body=body,
        timeout_s=timeout_s,
        reader=reader,
        secret=secret,
        on_headers=on_headers,
    )
    events = sse_data(lines)
    async with aclosing(lines), aclosing(events):
        yield events
