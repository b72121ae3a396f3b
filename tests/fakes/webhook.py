"""A fake alert webhook on loopback: records every POST, can fail the first N.

Served like the upstream fakes (an aiohttp app in a thread of its own), so it answers
a worker process in end-to-end tests and the worker loop in integration tests alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, FakeState, remember


@dataclass
class Hooks:
    fail_first: int = 0  # answer `fail_status` to this many POSTs before accepting
    fail_status: int = 500
    attempts: int = 0  # every POST, failed ones included
    accepted: list[Any] = field(default_factory=list)  # bodies answered 200, in order

    def for_subject(self, subject: str) -> list[dict[str, Any]]:
        """Accepted alerts about `subject` (a shared database may raise others)."""
        return [a for a in self.accepted if isinstance(a, dict) and a.get("subject") == subject]


class WebhookFake:
    def __init__(self, fail_first: int = 0, fail_status: int = 500) -> None:
        self.hooks = Hooks(fail_first=fail_first, fail_status=fail_status)
        self._server = FakeServer(self._app)

    @property
    def url(self) -> str:
        return self._server.url + "/hooks/alerts"

    @property
    def seen(self) -> list[Any]:
        """Every request, with its headers (FakeServer's record)."""
        return self._server.seen

    def _app(self, state: FakeState) -> web.Application:
        hooks = self.hooks

        async def receive(request: web.Request) -> web.Response:
            body = await remember(state, request)
            hooks.attempts += 1
            if hooks.attempts <= hooks.fail_first:
                return web.json_response({"error": "failing on purpose"}, status=hooks.fail_status)
            hooks.accepted.append(body)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/hooks/alerts", receive)
        return app

    def __enter__(self) -> WebhookFake:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
