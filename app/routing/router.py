"""Route lookup and deployment choice.

The strategies here are the plain ones; the routing issue brings least-latency EWMAs,
cycle-learned adaptive weights, retries, fallbacks and breakers on top of this interface.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from pydantic import SecretStr

from app.config import Settings
from app.errors import ModelNotFoundError, ServiceUnavailableError
from app.routing.config import KEYED_PROVIDERS, DeploymentConfig, RouteConfig, RoutesFile

log = logging.getLogger("flywheel.routing")


@dataclass(frozen=True, slots=True)
class Target:
    route: str
    deployment: DeploymentConfig
    api_key: SecretStr | None
    timeout_s: float


@dataclass(frozen=True, slots=True)
class _Candidate:
    deployment: DeploymentConfig
    api_key: SecretStr | None


class Router:
    def __init__(self, routes: RoutesFile, settings: Settings, rng: random.Random | None = None):
        self._routes = routes.routes
        self._rng = rng or random.Random()
        self._default_timeout = settings.flywheel_upstream_timeout_s
        self._candidates: dict[str, list[_Candidate]] = {}
        self.disabled: dict[str, str] = {}
        for name, route in self._routes.items():
            usable: list[_Candidate] = []
            for d in route.deployments:
                key = settings.provider_key(d.api_key_env) if d.api_key_env else None
                if key is None and d.provider in KEYED_PROVIDERS:
                    reason = f"{d.api_key_env or 'api_key_env'} is not set"
                    self.disabled[f"{name}/{d.name}"] = reason
                    log.warning("deployment %s/%s disabled: %s", name, d.name, reason)
                    continue
                usable.append(_Candidate(d, key))
            self._candidates[name] = usable

    @property
    def names(self) -> list[str]:
        return list(self._routes)

    def route(self, model: str) -> RouteConfig:
        route = self._routes.get(model)
        if route is None:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        return route

    def pick(self, model: str) -> Target:
        route = self.route(model)
        candidates = self._candidates[model]
        if not candidates:
            raise ServiceUnavailableError(
                f"route {model!r} has no usable deployment (provider keys missing)",
                code="no_deployment_available",
            )
        chosen = self._choose(route, candidates)
        d = chosen.deployment
        timeout = d.timeout_s or route.timeout_s or self._default_timeout
        return Target(route=model, deployment=d, api_key=chosen.api_key, timeout_s=timeout)

    def _choose(self, route: RouteConfig, candidates: list[_Candidate]) -> _Candidate:
        if len(candidates) == 1:
            return candidates[0]
        if route.strategy == "priority":
            best = min(c.deployment.priority for c in candidates)
            candidates = [c for c in candidates if c.deployment.priority == best]
            if len(candidates) == 1:
                return candidates[0]
        weights = [c.deployment.weight for c in candidates]
        if sum(weights) <= 0:
            return self._rng.choice(candidates)
        return self._rng.choices(candidates, weights=weights)[0]
