"""Run a fake upstream (an aiohttp web app) on 127.0.0.1 in a thread of its own.

A thread keeps the fake independent of the event loop under test, so it serves the
gateway process in end-to-end tests and the in-process app in API tests alike.

Fault modes are chosen by the upstream model name a deployment asks for, so one fake
serves every behaviour at once:
  fail-<status>   answer that status with the provider's error shape
                  (429 carries `Retry-After: 2`)
  slow-<ms>       wait that long before answering (or before the first chunk), and
                  while `state.hold` is set; a caller that hangs up is not answered
  cut-<n>         stream n content chunks, then drop the connection
  malformed       stream one good chunk, then a chunk that is not JSON
  drip-<ms>       stream chunks <ms> apart, many of them (for disconnect tests)
  weird           valid JSON of the wrong shape (choices / deltas that are not objects)
  toggle-<name>   500 while the model is in `state.failing`, else a normal answer
  lag             wait `state.lag_ms`, then a normal answer
  cap-<n>         429 when more than n requests are in flight; 50 ms each
  ctx-exceeded    400 context_length_exceeded, OpenAI's shape
  exhausted       a normal answer whose rate-limit headers say no requests remain (1 s)
  length          a normal answer cut by max_tokens (`finish_reason: length`)
  refuse          a refusal ("I'm sorry, but I can't help with that.")
  bad-json        text that is not JSON, whatever `response_format` asked
  off-schema      JSON of the wrong types for a `json_schema` (strings as numbers)
  bad-args        tool calls whose arguments are not JSON
  judge           an LLM judge's verdict: {"score": 8, "reason": "…"} in a code fence
  optimizer       an optimizer's reply: a JSON list of system prompts (one repeated)
anything else     a normal answer
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    """What a fake received, for assertions."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: Any


@dataclass
class FakeState:
    seen: list[Seen] = field(default_factory=list)
    open_streams: int = 0
    closed_streams: int = 0
    # Set when a streaming connection closed before the fake finished writing.
    disconnects: list[float] = field(default_factory=list)
    # Models named `toggle-…` answer 500 while they are in this set.
    failing: set[str] = field(default_factory=set)
    # Models named `lag` wait this long before answering.
    lag_ms: float = 0.0
    # Requests being answered now, per model (for `cap-<n>`).
    in_flight: dict[str, int] = field(default_factory=dict)
    peak_in_flight: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    # While set, `slow-<ms>` answers wait (after their delay) before answering, still
    # noticing a caller that hangs up: a test can hold every request in flight.
    hold: bool = False
    # Chat completions answered in full (200, not streamed), by the last message's text.
    answered: Counter[str] = field(default_factory=Counter)

    def count(self, model: str) -> int:
        """How many requests for `model` this fake has received."""
        return sum(
            1 for s in self.seen if isinstance(s.body, dict) and s.body.get("model") == model
        )


# Answers that arrive fine but that the quality rules mark down.
QUALITY_FAULTS = ("refuse", "bad-json", "off-schema", "bad-args")


def fault_of(model: str) -> tuple[str, int]:
    """('fail', 429), ('slow', 300), ('cut', 3), ('malformed', 0), ('drip', 50) or ('', 0)."""
    for kind in ("fail", "slow", "cut", "drip", "cap"):
        if model.startswith(kind + "-"):
            try:
                return kind, int(model.split("-", 1)[1])
            except ValueError:
                return "", 0
    if model in (
        "malformed",
        "weird",
        "lag",
        "ctx-exceeded",
        "exhausted",
        "length",
        "echo-error",
        "judge",
        "optimizer",
        *QUALITY_FAULTS,
    ):
        return model, 0
    if model.startswith("toggle-"):
        return "toggle", 0
    return "", 0


class FakeServer:
    def __init__(self, make_app: Callable[[FakeState], web.Application]) -> None:
        self.state = FakeState()
        self._make_app = make_app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[Seen]:
        return self.state.seen

    def start(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._make_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_or_disconnect(state: FakeState, request: web.Request, seconds: float) -> bool:
    """Sleep like a slow upstream, but notice (and note) a caller that hangs up: False."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            state.disconnects.append(time.monotonic())
            return False
        await asyncio.sleep(0.01)
    while state.hold:
        transport = request.transport
        if transport is None or transport.is_closing():
            state.disconnects.append(time.monotonic())
            return False
        await asyncio.sleep(0.01)
    return True


async def remember(state: FakeState, request: web.Request) -> Any:
    body: Any = None
    if request.can_read_body:
        raw = await request.read()
        try:
            body = await request.json() if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
    state.seen.append(
        Seen(request.method, request.path, dict(request.headers), dict(request.query), body)
    )
    return body
