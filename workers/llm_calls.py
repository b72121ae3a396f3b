"""The worker's own LLM calls (the judge's, the optimizer's) through the gateway's router.

A configured route is called the way the gateway calls it: its rules, its deployments in
strategy order, retries, fallbacks and breakers, under one deadline (`Dispatcher`), with
the same provider adapters. What the gateway adds around a client's request does not
apply: no key, no limits, no cache, no prompt variant, and above all no record. The
calls never enter the request stream, so they are neither counted as traffic nor
scored, judged or optimized themselves; each is tagged (`user`) for the upstream's own
logs, and its cost is logged and returned to the step that made it.

Built once per worker (`open`), only for the routes it calls and what they fall back to,
with one long-lived upstream session, closed at shutdown.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.api.calls import chat_call
from app.config import Settings, pii_kinds
from app.errors import InvalidRequestError
from app.observability.redact import Redactors
from app.providers.base import JSON
from app.providers.http import make_session
from app.providers.mock import prompt_tokens
from app.providers.registry import ProviderRegistry
from app.routing.config import RouteConfig, RoutesFile
from app.routing.dispatch import Dispatcher
from app.routing.router import RequestFacts, Router, Target
from app.schemas.chat import CHAT_REQUEST

log = logging.getLogger("flywheel.cycle.llm")

# The worker makes a handful of calls at a time (the judge's are bounded by its own
# concurrency), not the gateway's thousands.
MAX_CONNECTIONS = 16
JUDGE_TAG = "flywheel-judge"
OPTIMIZER_TAG = "flywheel-optimizer"


@dataclass(frozen=True, slots=True)
class LLMAnswer:
    text: str
    route: str  # the route that answered (a fallback, maybe)
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    attempts: int


def routes_reached(routes: RoutesFile, roots: Iterable[str | None]) -> RoutesFile | None:
    """The routes `roots` name and every route they can reach (rules, fallbacks): the
    worker's router needs no other, and building others would repeat the gateway's
    warnings about their missing keys."""
    keep: dict[str, RouteConfig] = {}
    queue = [r for r in roots if r is not None and r in routes.routes]
    while queue:
        name = queue.pop()
        if name in keep:
            continue
        config = keep[name] = routes.routes[name]
        queue += config.fallbacks
        queue += [rule.route for rule in config.rules]
        queue += config.ensemble.members if config.ensemble else []
    return RoutesFile(routes=keep) if keep else None


def redactors_for(settings: Settings, routes: RoutesFile) -> Redactors:
    """Each route's redactor, as the gateway builds them (`app.main.create_app`)."""
    return Redactors(
        pii_kinds(settings.flywheel_redact_pii),
        {name: route.redact for name, route in routes.routes.items()},
    )


class LLMCalls:
    def __init__(self, settings: Settings, routes: RoutesFile, http: aiohttp.ClientSession) -> None:
        self.router = Router(routes, settings)
        self.dispatcher = Dispatcher(self.router)
        self.providers = ProviderRegistry(http)
        self.default_timeout_s = settings.flywheel_upstream_timeout_s
        self._http = http

    @classmethod
    def open(cls, settings: Settings, routes: RoutesFile) -> LLMCalls | None:
        """The worker's caller for its judge and optimizer routes; None when neither is
        configured (or neither is in the routes file: said once, here)."""
        wanted = {
            "FLYWHEEL_JUDGE_ROUTE": settings.flywheel_judge_route,
            "FLYWHEEL_OPTIMIZER_ROUTE": settings.flywheel_optimizer_route,
        }
        for setting, name in wanted.items():
            if name is not None and name not in routes.routes:
                log.warning("%s names %r, which is not a route: not used", setting, name)
        reached = routes_reached(routes, wanted.values())
        if reached is None:
            return None
        http = make_session(
            max_connections=MAX_CONNECTIONS,
            connect_timeout_s=settings.flywheel_upstream_connect_timeout_s,
        )
        return cls(settings, reached, http)

    def knows(self, route: str | None) -> bool:
        return route is not None and route in self.router.routes

    @property
    def closed(self) -> bool:
        return self._http.closed

    async def close(self) -> None:
        await self._http.close()

    async def complete(
        self, route: str, messages: list[dict[str, Any]], *, tag: str, timeout_s: float
    ) -> LLMAnswer:
        """One non-streaming completion from `route`, within `timeout_s` across every
        attempt. Raises the gateway's errors (`GatewayError`) when no attempt succeeds."""
        body: dict[str, Any] = {"model": route, "messages": messages, "user": tag}
        chat = CHAT_REQUEST.validate_python(body)
        name = self.router.resolve(route, RequestFacts(prompt_tokens=prompt_tokens(chat)))
        config = self.router.route(name)
        if config.ensemble is not None:
            raise InvalidRequestError(
                f"route {name!r} is an ensemble: the worker calls plain routes"
            )
        rid = f"{tag}-{uuid.uuid4().hex[:24]}"
        attempts = 0

        def count() -> None:
            nonlocal attempts
            attempts += 1

        def attempt(target: Target) -> Awaitable[JSON]:
            provider = self.providers.get(target.deployment.provider)
            return provider.complete(chat_call(target, chat, body, rid))

        budget = min(timeout_s, config.timeout_s or self.default_timeout_s)
        won = await self.dispatcher.run(
            name, attempt, deadline=time.monotonic() + budget, count=count
        )
        won.lease.succeeded()
        return self._answer(won.value, won.target, attempts, tag)

    @staticmethod
    def _answer(result: JSON, target: Target, attempts: int, tag: str) -> LLMAnswer:
        usage = result.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        d = target.deployment
        cost = prompt / 1000 * d.input_cost_per_1k + completion / 1000 * d.output_cost_per_1k
        choices = result.get("choices") or [{}]
        message = choices[0].get("message") or {}
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        log.debug(
            "%s call on %s/%s: %d+%d tokens, $%.6f, %d attempts",
            tag,
            target.route,
            d.name,
            prompt,
            completion,
            cost,
            attempts,
        )
        return LLMAnswer(
            text=content if isinstance(content, str) else "",
            route=target.route,
            deployment=d.name,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=cost,
            attempts=attempts,
        )
