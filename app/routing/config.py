"""The routes file: its schema, loading, validation and the built-in defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.config import Settings

ProviderName = Literal["openai", "openai_compatible", "anthropic", "gemini", "mock"]
Strategy = Literal["priority", "weighted", "least_latency", "adaptive"]

# Providers whose deployments cannot work without a key.
KEYED_PROVIDERS = frozenset({"openai", "anthropic", "gemini"})


class RoutesFileError(ValueError):
    """A routes file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MockParams(_Strict):
    """How a `mock` deployment behaves: deterministic for a given seed."""

    latency_ms: float = Field(default=20.0, ge=0)
    jitter_ms: float = Field(default=5.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    quality: float = Field(default=0.95, ge=0, le=1)
    seed: int = 0
    # Demos and drills: a request's `metadata["mock.<deployment>.<field>"]` overrides
    # these fields for that request (see app/providers/mock.py).
    steerable: bool = False


class DeploymentConfig(_Strict):
    name: str = Field(min_length=1)
    provider: ProviderName
    model: str = Field(min_length=1)
    api_base: str | None = None
    api_key_env: str | None = None
    weight: float = Field(default=1.0, ge=0)
    priority: int = 0
    input_cost_per_1k: float = Field(default=0.0, ge=0)
    output_cost_per_1k: float = Field(default=0.0, ge=0)
    timeout_s: float | None = Field(default=None, gt=0)
    context_window: int | None = Field(default=None, gt=0)
    stream_usage: bool = True
    mock: MockParams | None = None


class BreakerConfig(_Strict):
    window_s: float = Field(default=30.0, gt=0)
    min_requests: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    cooldown_s: float = Field(default=10.0, gt=0)
    max_cooldown_s: float = Field(default=300.0, gt=0)
    probes: int = Field(default=2, ge=1)


class ConcurrencyConfig(_Strict):
    # false: no gateway-side limit (the upstream's own 429s are all there is).
    adaptive: bool = True
    initial: float = Field(default=16, ge=1)
    minimum: float = Field(default=1, ge=1)
    maximum: float = Field(default=512, ge=1)
    latency_threshold_s: float = Field(default=5.0, gt=0)
    # A request over the limit waits up to this many times the typical latency.
    max_wait_factor: float = Field(default=3.0, ge=0)


class HedgeConfig(_Strict):
    enabled: bool = True
    # Hedge when the first byte is later than this quantile of recent first-byte times.
    quantile: float = Field(default=0.95, gt=0, lt=1)
    min_delay_ms: float = Field(default=10.0, ge=0)


class RuleConfig(_Strict):
    """Send the request to `route` when every condition given holds."""

    route: str
    prompt_tokens_over: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    header: dict[str, str] | None = None

    @model_validator(mode="after")
    def _has_condition(self) -> RuleConfig:
        if self.prompt_tokens_over is None and not self.metadata and not self.header:
            raise ValueError("a rule needs prompt_tokens_over, metadata or header")
        return self


EnsembleStrategy = Literal["first_success", "voting", "best_of_n", "concatenate", "ensemble"]


class EnsembleConfig(_Strict):
    strategy: EnsembleStrategy
    members: list[str] = Field(min_length=2)


CacheMode = Literal["on", "off", "read_only", "write_only"]


class CacheConfig(_Strict):
    """The route's response cache; a route without one follows FLYWHEEL_CACHE_MODE/TTL_S."""

    mode: CacheMode = "on"
    ttl_s: float | None = Field(default=None, gt=0)
    # Store answers cut by max_tokens (finish_reason "length") too.
    store_truncated: bool = False

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        # YAML 1.1 reads a bare `on`/`off` as a boolean: take it as the word it was.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class BodiesConfig(_Strict):
    """Store the route's request and response bodies (redacted) with their own retention."""

    store: bool = False
    retention_days: float | None = Field(default=None, gt=0)  # else FLYWHEEL_BODY_RETENTION_DAYS


class LimitsConfig(_Strict):
    """Per-key limits on this route when Redis is unreachable: each replica enforces its
    share locally, or the route refuses requests (503). Unset: FLYWHEEL_LIMITS_ON_REDIS_DOWN."""

    on_redis_down: Literal["local", "closed"] | None = None


class CycleConfig(_Strict):
    """What the virtuous cycle holds this route to.

    Quality thresholds on the effective score (feedback > judge > rules); the latency SLO
    is a quality rule (an answer slower than it loses points); the budgets are where the
    monitor starts and adapts from (unset: learned from the first observations).
    """

    critical: float = Field(default=0.85, ge=0, le=1)
    warning: float = Field(default=0.90, ge=0, le=1)
    target: float = Field(default=0.95, ge=0, le=1)
    latency_slo_ms: float | None = Field(default=None, gt=0)
    latency_budget_ms: float | None = Field(default=None, gt=0)
    cost_budget_usd: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> CycleConfig:
        if not self.critical <= self.warning <= self.target:
            raise ValueError("thresholds must be ordered: critical <= warning <= target")
        return self


class RouteConfig(_Strict):
    strategy: Strategy = "weighted"
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0)
    # Attempts after the first, across the route's deployments, before its fallbacks.
    retries: int = Field(default=2, ge=0, le=10)
    rules: list[RuleConfig] = Field(default_factory=list)
    hedging: HedgeConfig | None = None
    ensemble: EnsembleConfig | None = None
    breaker: BreakerConfig = BreakerConfig()
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    cache: CacheConfig | None = None
    bodies: BodiesConfig | None = None
    limits: LimitsConfig | None = None
    # PII kinds masked in this route's logs, traces, LangSmith runs and stored bodies
    # (unset: FLYWHEEL_REDACT_PII). Secrets are masked whatever this says.
    redact: list[Literal["email", "phone", "card", "national_id"]] | None = None
    cycle: CycleConfig = CycleConfig()

    @model_validator(mode="after")
    def _deployments_or_ensemble(self) -> RouteConfig:
        if self.ensemble is None and not self.deployments:
            raise ValueError("a route needs deployments (or an ensemble of routes)")
        if self.ensemble is not None and self.deployments:
            raise ValueError("an ensemble route lists member routes, not deployments")
        names = [d.name for d in self.deployments]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"deployment names must be unique, repeated: {duplicates}")
        return self


class RoutesFile(_Strict):
    routes: dict[str, RouteConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _references_exist(self) -> RoutesFile:
        for name, route in self.routes.items():
            for target in route.fallbacks:
                if target not in self.routes:
                    raise ValueError(f"route {name!r} falls back to unknown route {target!r}")
                if target == name:
                    raise ValueError(f"route {name!r} falls back to itself")
                if self.routes[target].ensemble is not None:
                    raise ValueError(f"route {name!r} falls back to ensemble {target!r}")
            for rule in route.rules:
                if rule.route not in self.routes or rule.route == name:
                    raise ValueError(f"route {name!r} has a rule to unknown route {rule.route!r}")
            for member in route.ensemble.members if route.ensemble else []:
                if member not in self.routes or self.routes[member].ensemble is not None:
                    raise ValueError(
                        f"ensemble {name!r} has member {member!r}, which is not a plain route"
                    )
        return self


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_routes(data: Any, source: str) -> RoutesFile:
    try:
        return RoutesFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise RoutesFileError(
            f"{source}: invalid key {_location(first['loc'])}: {first['msg']}"
            + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else "")
        ) from e


def load_routes_file(path: Path) -> RoutesFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RoutesFileError(f"{path}: cannot read routes file: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RoutesFileError(f"{path}: not valid YAML: {e}") from e
    return parse_routes(data, str(path))


# Built-in routes: `demo` always, and one example route per provider whose key is set.
# flywheel.example.yaml documents the same routes for operators to copy and extend.
_EXAMPLES: tuple[tuple[str, str, str, str, str | None, float, float], ...] = (
    ("gpt-4o-mini", "openai", "gpt-4o-mini", "OPENAI_API_KEY", None, 0.00015, 0.0006),
    (
        "claude-haiku",
        "anthropic",
        "claude-3-5-haiku-latest",
        "ANTHROPIC_API_KEY",
        None,
        0.0008,
        0.004,
    ),
    ("gemini-flash", "gemini", "gemini-2.0-flash", "GEMINI_API_KEY", None, 0.0001, 0.0004),
    (
        "groq-llama",
        "openai_compatible",
        "llama-3.3-70b-versatile",
        "GROQ_API_KEY",
        "https://api.groq.com/openai/v1",
        0.00059,
        0.00079,
    ),
)


def default_routes(settings: Settings) -> RoutesFile:
    routes: dict[str, Any] = {
        "demo": {
            "strategy": "weighted",
            "deployments": [
                {
                    "name": "mock-fast",
                    "provider": "mock",
                    "model": "mock-fast",
                    "weight": 3,
                    "input_cost_per_1k": 0.0001,
                    "output_cost_per_1k": 0.0002,
                    "mock": {"latency_ms": 30, "jitter_ms": 10, "quality": 0.9, "seed": 1},
                },
                {
                    "name": "mock-smart",
                    "provider": "mock",
                    "model": "mock-smart",
                    "weight": 1,
                    "input_cost_per_1k": 0.001,
                    "output_cost_per_1k": 0.002,
                    "mock": {"latency_ms": 120, "jitter_ms": 30, "quality": 0.98, "seed": 2},
                },
            ],
            "cache": {"mode": "on", "ttl_s": 300},
        },
        # The virtuous cycle's demo (`make demo`): three deployments that differ in
        # quality, latency and price; the cycle learns which gives the most for the
        # money. Steerable, so the demo can degrade one on demand. No cache (every
        # request is a new answer to learn from); bodies kept a day for the dataset
        # export; a fixed latency budget, so only quality and cost rank them.
        "demo-cycle": {
            "strategy": "adaptive",
            "cache": {"mode": "off"},
            "bodies": {"store": True, "retention_days": 1},
            "cycle": {"latency_budget_ms": 1500},
            "deployments": [
                {
                    "name": "cycle-budget",
                    "provider": "mock",
                    "model": "mock-budget",
                    "input_cost_per_1k": 0.0001,
                    "output_cost_per_1k": 0.0002,
                    "mock": {
                        "latency_ms": 40,
                        "jitter_ms": 10,
                        "quality": 0.7,
                        "seed": 11,
                        "steerable": True,
                    },
                },
                {
                    "name": "cycle-balanced",
                    "provider": "mock",
                    "model": "mock-balanced",
                    "input_cost_per_1k": 0.0005,
                    "output_cost_per_1k": 0.0015,
                    "mock": {
                        "latency_ms": 90,
                        "jitter_ms": 20,
                        "quality": 0.9,
                        "seed": 12,
                        "steerable": True,
                    },
                },
                {
                    "name": "cycle-premium",
                    "provider": "mock",
                    "model": "mock-premium",
                    "input_cost_per_1k": 0.0025,
                    "output_cost_per_1k": 0.01,
                    "mock": {
                        "latency_ms": 250,
                        "jitter_ms": 50,
                        "quality": 0.99,
                        "seed": 13,
                        "steerable": True,
                    },
                },
            ],
        },
    }
    for route, provider, model, key_env, api_base, cost_in, cost_out in _EXAMPLES:
        if settings.provider_key(key_env) is None:
            continue
        deployment: dict[str, Any] = {
            "name": route,
            "provider": provider,
            "model": model,
            "api_key_env": key_env,
            "input_cost_per_1k": cost_in,
            "output_cost_per_1k": cost_out,
        }
        if api_base:
            deployment["api_base"] = api_base
        routes[route] = {"strategy": "priority", "deployments": [deployment]}
    return parse_routes({"routes": routes}, "built-in routes")


def load_routes(settings: Settings) -> RoutesFile:
    path = settings.routes_path
    return default_routes(settings) if path is None else load_routes_file(path)
