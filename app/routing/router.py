"""Route lookup, conditional rules, and the order in which a route's deployments are tried.

Strategies: `priority` (ordered failover), `weighted` (weighted random), `least_latency`
(lowest recent median latency first, with a little exploration) and `adaptive` (weights the virtuous
cycle writes to Redis; until it has, the configured weights). Each deployment has its
runtime state here: breaker, concurrency limiter and latency statistics.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import SecretStr

from app.config import Settings
from app.errors import ModelNotFoundError, ServiceUnavailableError
from app.routing.breaker import Breaker, BreakerPolicy
from app.routing.config import KEYED_PROVIDERS, DeploymentConfig, RouteConfig, RoutesFile
from app.routing.limiter import ConcurrencyLimiter, LimiterPolicy
from app.routing.pacing import pause_for
from app.routing.stats import LatencyStats

log = logging.getLogger("flywheel.routing")

EXPLORATION = 0.1


@dataclass(slots=True)
class Deployment:
    """A deployment of a route and what the router has learned about it."""

    route: str
    config: DeploymentConfig
    api_key: SecretStr | None
    breaker: Breaker
    limiter: ConcurrencyLimiter
    stats: LatencyStats = field(default_factory=LatencyStats)
    # No request before this time (monotonic): the upstream's Retry-After.
    not_before: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    def usable(self, now: float) -> bool:
        return now >= self.not_before and self.breaker.allows()

    def pace(self, headers: Mapping[str, str]) -> None:
        """Hold new requests while the upstream says a rate limit is used up."""
        wait = pause_for(headers)
        if wait is not None and wait > 0:
            self.not_before = max(self.not_before, time.monotonic() + wait)
            self.limiter.pause(wait)


@dataclass(frozen=True, slots=True)
class Target:
    route: str
    deployment: DeploymentConfig
    api_key: SecretStr | None
    timeout_s: float
    on_headers: Callable[[Mapping[str, str]], None] | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What conditional rules may look at."""

    prompt_tokens: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


class Router:
    def __init__(
        self, routes: RoutesFile, settings: Settings, rng: random.Random | None = None
    ) -> None:
        self._routes = routes.routes
        self._rng = rng or random.Random()
        self.default_timeout_s = settings.flywheel_upstream_timeout_s
        self.deployments: dict[str, list[Deployment]] = {}
        self.disabled: dict[str, str] = {}
        # Cycle-learned weights for `adaptive` routes: route → deployment → weight.
        self.learned_weights: dict[str, dict[str, float]] = {}
        for name, route in self._routes.items():
            self.deployments[name] = self._build(name, route, settings)

    def _build(self, name: str, route: RouteConfig, settings: Settings) -> list[Deployment]:
        usable: list[Deployment] = []
        b, c = route.breaker, route.concurrency
        for d in route.deployments:
            key = settings.provider_key(d.api_key_env) if d.api_key_env else None
            if key is None and d.provider in KEYED_PROVIDERS:
                reason = f"{d.api_key_env or 'api_key_env'} is not set"
                self.disabled[f"{name}/{d.name}"] = reason
                log.warning("deployment %s/%s disabled: %s", name, d.name, reason)
                continue
            usable.append(
                Deployment(
                    route=name,
                    config=d,
                    api_key=key,
                    breaker=Breaker(BreakerPolicy(**b.model_dump())),
                    limiter=ConcurrencyLimiter(
                        LimiterPolicy(**c.model_dump(exclude={"max_wait_factor"}))
                    ),
                )
            )
        return usable

    @property
    def names(self) -> list[str]:
        return list(self._routes)

    @property
    def routes(self) -> Mapping[str, RouteConfig]:
        return self._routes

    def route(self, model: str) -> RouteConfig:
        route = self._routes.get(model)
        if route is None:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        return route

    def resolve(self, model: str, facts: RequestFacts) -> str:
        """The route a request goes to: the one asked for, or where a rule sends it."""
        seen = {model}
        name = model
        while True:
            target = self._first_rule(self.route(name), facts)
            if target is None or target in seen:
                return name
            seen.add(target)
            name = target

    @staticmethod
    def _first_rule(route: RouteConfig, facts: RequestFacts) -> str | None:
        for rule in route.rules:
            if (
                rule.prompt_tokens_over is not None
                and facts.prompt_tokens <= rule.prompt_tokens_over
            ):
                continue
            if rule.metadata and any(facts.metadata.get(k) != v for k, v in rule.metadata.items()):
                continue
            if rule.header and any(
                facts.headers.get(k.lower()) != v for k, v in rule.header.items()
            ):
                continue
            return rule.route
        return None

    def target(self, d: Deployment, remaining_s: float | None = None) -> Target:
        route = self._routes[d.route]
        timeout = d.config.timeout_s or route.timeout_s or self.default_timeout_s
        if remaining_s is not None:
            timeout = min(timeout, remaining_s)
        return Target(
            route=d.route,
            deployment=d.config,
            api_key=d.api_key,
            timeout_s=timeout,
            on_headers=d.pace,
        )

    def ordered(self, name: str) -> list[Deployment]:
        """The route's deployments in the order its strategy wants them tried."""
        route = self.route(name)
        pool = self.deployments[name]
        if not pool:
            raise ServiceUnavailableError(
                f"route {name!r} has no usable deployment (provider keys missing)",
                code="no_deployment_available",
            )
        if len(pool) == 1:
            return list(pool)
        if route.strategy == "priority":
            by_level: dict[int, list[Deployment]] = {}
            for d in pool:
                by_level.setdefault(d.config.priority, []).append(d)
            out: list[Deployment] = []
            for level in sorted(by_level):
                out += self._weighted_order(by_level[level], {})
            return out
        if route.strategy == "least_latency":
            # Deployments never measured go first: that is how they get measured. Now
            # and then the least recently measured one goes first, so a deployment that
            # was slow once is measured again instead of being avoided for good.
            by_latency = sorted(pool, key=lambda d: d.stats.typical_s)
            if self._rng.random() < EXPLORATION:
                stalest = min(pool, key=lambda d: d.stats.observed_at)
                return [stalest, *(d for d in by_latency if d is not stalest)]
            return by_latency
        learned = self.learned_weights.get(name, {}) if route.strategy == "adaptive" else {}
        return self._weighted_order(pool, learned)

    def _weighted_order(
        self, pool: list[Deployment], learned: Mapping[str, float]
    ) -> list[Deployment]:
        """A weighted random permutation (sampling without replacement)."""
        keyed = []
        for d in pool:
            weight = learned.get(d.name, d.config.weight)
            # Efraimidis-Spirakis: key u^(1/w); a zero weight goes last.
            u = self._rng.random()
            keyed.append((u ** (1.0 / weight) if weight > 0 else -1.0, d))
        keyed.sort(key=lambda kw: kw[0], reverse=True)
        return [d for _, d in keyed]

    def context_window(self, name: str) -> int:
        """The largest context window among a route's deployments (0 when unknown)."""
        return max(
            (d.config.context_window or 0 for d in self.deployments.get(name, [])), default=0
        )

    def snapshot(self) -> list[dict[str, object]]:
        now = time.monotonic()
        return [
            {
                "route": d.route,
                "deployment": d.name,
                "provider": d.config.provider,
                "circuit": d.breaker.snapshot(),
                "concurrency": d.limiter.snapshot(),
                "latency_ewma_ms": None
                if d.stats.ewma_s is None
                else round(d.stats.ewma_s * 1000, 2),
                "retry_after_s": round(max(0.0, d.not_before - now), 2),
            }
            for pool in self.deployments.values()
            for d in pool
        ]
