"""Process settings, read from the environment (and `.env`) by pydantic-settings.

Every field here is listed in `.env.example`; a test keeps the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from limits import parse
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["dev", "staging", "prod"]
Policy = Literal["cost_optimized", "balanced", "quality_optimized"]
PII_KINDS = ("email", "phone", "card", "national_id")

# Provider keys the gateway knows by their usual names. A deployment may name any
# other variable in `api_key_env`; those are looked up in the process environment.
PROVIDER_KEY_FIELDS = (
    "openai_api_key",
    "anthropic_api_key",
    "groq_api_key",
    "gemini_api_key",
    "together_api_key",
    "openrouter_api_key",
    "deepseek_api_key",
    "mistral_api_key",
)


class SettingsError(ValueError):
    """The environment does not describe a startable gateway."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    flywheel_env: Environment = "dev"
    flywheel_policy: Policy = "balanced"
    flywheel_config: Path | None = None
    flywheel_master_key: SecretStr | None = None
    flywheel_var_dir: Path = Path("var")
    flywheel_log_level: str = "INFO"
    flywheel_max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    flywheel_upstream_timeout_s: float = Field(default=120.0, gt=0)
    flywheel_upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    flywheel_upstream_max_connections: int = Field(default=1000, gt=0)
    flywheel_redis_timeout_s: float = Field(default=0.25, gt=0)
    flywheel_redis_prefix: str = "flywheel:"
    flywheel_weights_refresh_s: float = Field(default=5.0, gt=0)
    flywheel_cache_mode: Literal["on", "off", "read_only", "write_only"] = "off"
    flywheel_cache_ttl_s: float = Field(default=3600.0, gt=0)
    flywheel_cache_max_ttl_s: float = Field(default=30 * 86400.0, gt=0)
    flywheel_cache_l1_max_entries: int = Field(default=10_000, ge=0)
    flywheel_cache_l1_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    flywheel_cache_redis_timeout_s: float = Field(default=0.1, gt=0)
    flywheel_cache_redis_max_connections: int = Field(default=64, gt=0)
    flywheel_cache_compress_min_bytes: int = Field(default=1024, ge=0)
    flywheel_cache_lock_wait_s: float = Field(default=10.0, ge=0)
    # Keys: "required" (no valid key, no answer) or "optional" (no key or an unknown one
    # is served as anonymous); unset, required outside dev.
    flywheel_auth: Literal["required", "optional"] | None = None
    flywheel_key_cache_s: float = Field(default=60.0, gt=0)
    flywheel_key_miss_cache_s: float = Field(default=5.0, gt=0)
    flywheel_key_stale_s: float = Field(default=300.0, ge=0)
    flywheel_key_lookup_timeout_s: float = Field(default=1.0, gt=0)
    # Limits. HTTP-level (slowapi, per process, in memory; "N/second|minute|hour|day"):
    # per client address, for health and metrics per address, and per key on the /v1
    # endpoints for keys without an RPM of their own.
    flywheel_http_limits: bool = True
    flywheel_http_limit_ip: str = "60000/minute"
    flywheel_http_limit_health: str = "1000/minute"
    flywheel_http_limit_chat: str = "100/minute"
    flywheel_http_limit_embeddings: str = "1000/minute"
    # Per-key RPM/TPM/budgets live in Redis; without it each gateway process enforces the
    # limit divided by this count (processes, not hosts), or refuses ("closed").
    flywheel_replicas: int = Field(default=1, ge=1)
    flywheel_limits_on_redis_down: Literal["local", "closed"] = "local"
    # Completion tokens reserved for a request that does not set max_tokens.
    flywheel_limit_completion_tokens: int = Field(default=256, gt=0)
    # Persistence (workers): the request stream, consolidation, retention.
    flywheel_records_stream_maxlen: int = Field(default=50_000, gt=0)
    flywheel_records_buffer: int = Field(default=50_000, gt=0)
    flywheel_records_interval_s: float = Field(default=0.05, gt=0, le=60)
    flywheel_consolidate_batch_size: int = Field(default=10, gt=0)
    flywheel_consolidate_delay_s: float = Field(default=0.05, ge=0)
    flywheel_consolidate_claim_idle_s: float = Field(default=30.0, gt=0)
    flywheel_request_retention_days: float = Field(default=30.0, gt=0)
    flywheel_body_retention_days: float = Field(default=7.0, gt=0)
    flywheel_metrics_interval_s: int = Field(default=300, ge=10, le=3600)
    flywheel_metrics_history_points: int = Field(default=288, gt=0)
    flywheel_snapshot_dir: Path | None = None
    flywheel_snapshot_interval_h: float = Field(default=6.0, gt=0)
    flywheel_snapshot_keep: int = Field(default=10, gt=0)
    flywheel_snapshot_cache_entries: int = Field(default=1000, ge=0)
    # Observability. PII kinds masked (email, phone, card, national_id) wherever content
    # is logged, traced, sent to LangSmith or stored; a route may set its own. Secrets
    # (API-key-like strings) are always masked.
    flywheel_redact_pii: str = "email,phone,card,national_id"  # comma-separated; "" none
    flywheel_access_log: bool = True  # one line per request, with its record's facts
    flywheel_access_log_bodies: bool = False  # and bodies (routes that keep them), masked
    flywheel_metrics_token: SecretStr | None = None  # GET /metrics wants this bearer token
    # LangSmith runs carry the request's messages and answer ("redacted") or no content.
    flywheel_langsmith_content: Literal["redacted", "none"] = "redacted"
    flywheel_langsmith_queue: int = Field(default=10_000, gt=0)
    # Anomaly detection (worker): every interval, each deployment's last window against
    # its baseline; alerts de-duplicated per (subject, kind) for the cooldown.
    flywheel_alert_interval_s: float = Field(default=30.0, gt=0)
    flywheel_alert_window_s: float = Field(default=300.0, gt=0)
    flywheel_alert_baseline_s: float = Field(default=3600.0, gt=0)
    flywheel_alert_min_samples: int = Field(default=20, gt=0)
    flywheel_alert_cooldown_s: float = Field(default=900.0, ge=0)
    flywheel_alert_webhook_url: SecretStr | None = None
    flywheel_alert_webhook_retries: int = Field(default=3, ge=0)

    # The virtuous cycle (worker): every interval, per route, deployment and prompt
    # variant over the window (old evidence decays with the half-life): quality,
    # routing weights, experiments, candidate prompts.
    flywheel_cycle_interval_s: float = Field(default=300.0, gt=0)
    flywheel_cycle_window_h: float = Field(default=24.0, gt=0, le=24 * 30)
    flywheel_cycle_half_life_h: float = Field(default=6.0, gt=0)
    flywheel_cycle_exploration: float = Field(default=0.05, ge=0, lt=1)
    flywheel_cycle_min_observations: int = Field(default=100, gt=0)
    flywheel_experiment_min_sample: int = Field(default=200, gt=0)
    flywheel_experiment_min_improvement: float = Field(default=0.02, ge=0, lt=1)
    flywheel_experiment_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    flywheel_experiment_max_sample: int = Field(default=20_000, gt=0)
    # An LLM judge scores this share of the answers of routes that keep bodies (it
    # reads the exchange from them) through the named route; unset: no judge.
    flywheel_judge_route: str | None = None
    flywheel_judge_sample: float = Field(default=0.05, ge=0, le=1)
    # An optimizer route writes candidate system prompts for routes under their
    # warning threshold; unset: no candidate generation.
    flywheel_optimizer_route: str | None = None
    flywheel_optimizer_candidates: int = Field(default=3, ge=1, le=10)
    flywheel_optimizer_cooldown_s: float = Field(default=7200.0, ge=0)
    flywheel_optimizer_max_running: int = Field(default=3, ge=1)
    flywheel_optimizer_traffic_share: float = Field(default=0.1, gt=0, lt=1)
    # How long a gateway remembers which key made a request, so feedback can be
    # checked before the request's row reaches the database.
    flywheel_feedback_owner_ttl_s: float = Field(default=600.0, gt=0)
    # Files (`/v1/files`) live here, shared by every gateway and worker (a volume they
    # all mount); unset: `<var dir>/files`. Uploads over the size limit get a 413.
    flywheel_files_dir: Path | None = None
    flywheel_files_max_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    # Batch files (inputs and outputs) expire after this many days unless the upload
    # (or the batch's `output_expires_after`) says otherwise.
    flywheel_batch_file_expiry_days: float = Field(default=30.0, gt=0)
    flywheel_batch_max_requests: int = Field(default=50_000, gt=0)
    # Lines in flight per batch, and for every batch together across all workers.
    flywheel_batch_concurrency: int = Field(default=8, gt=0)
    flywheel_batch_global_concurrency: int = Field(default=64, gt=0)
    # Batches one worker runs at once; tries per line on retryable errors (429, 5xx,
    # timeouts) before it is written to the error file.
    flywheel_batch_max_active: int = Field(default=4, gt=0)
    flywheel_batch_line_attempts: int = Field(default=4, gt=0)
    # A worker holds a batch for this long and renews it while running; a crashed
    # worker's batch is taken over once it lapses.
    flywheel_batch_lease_s: float = Field(default=30.0, gt=0)
    # How often a worker looks for batches to run, and a running batch for a cancel.
    flywheel_batch_poll_s: float = Field(default=1.0, gt=0)
    # The worker's CPU priority below the gateways' (a `nice` increment): where both
    # share a host, its background work (batches, consolidation, the cycle) gives way
    # to live requests when the CPU is busy. 0 keeps it equal.
    flywheel_worker_nice: int = Field(default=10, ge=0, le=19)
    # How long a dashboard login lasts (a signed cookie; a new master key ends them all).
    flywheel_dashboard_session_s: int = Field(default=12 * 3600, ge=60, le=30 * 86400)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    redis_url: SecretStr | None = None
    database_url: SecretStr | None = None

    openai_api_key: SecretStr | None = None
    anthropic_api_key: SecretStr | None = None
    groq_api_key: SecretStr | None = None
    gemini_api_key: SecretStr | None = None
    together_api_key: SecretStr | None = None
    openrouter_api_key: SecretStr | None = None
    deepseek_api_key: SecretStr | None = None
    mistral_api_key: SecretStr | None = None

    otel_service_name: str = "flywheel"
    otel_exporter_otlp_endpoint: str | None = None
    langsmith_tracing: bool = False
    langsmith_api_key: SecretStr | None = None
    langsmith_project: str | None = None
    langsmith_endpoint: str | None = None

    @field_validator(
        "redis_url",
        "database_url",
        "flywheel_master_key",
        "flywheel_config",
        "flywheel_snapshot_dir",
        "flywheel_files_dir",
        "flywheel_auth",
        "otel_exporter_otlp_endpoint",
        "langsmith_api_key",
        "langsmith_project",
        "langsmith_endpoint",
        "flywheel_metrics_token",
        "flywheel_alert_webhook_url",
        "flywheel_judge_route",
        "flywheel_optimizer_route",
        *PROVIDER_KEY_FIELDS,
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `KEY=` in .env or compose's `${KEY:-}` means "not set", never "set to nothing".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "flywheel_http_limit_ip",
        "flywheel_http_limit_health",
        "flywheel_http_limit_chat",
        "flywheel_http_limit_embeddings",
    )
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError as e:
            raise ValueError(f"{value!r} is not a rate limit such as '100/minute'") from e
        return value

    @field_validator("flywheel_redact_pii")
    @classmethod
    def _pii_kinds(cls, value: str) -> str:
        unknown = set(pii_kinds(value)) - set(PII_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {PII_KINDS}")
        return value

    @model_validator(mode="after")
    def _master_key_outside_dev(self) -> Settings:
        if self.flywheel_env != "dev" and self.flywheel_master_key is None:
            raise SettingsError(
                f"FLYWHEEL_MASTER_KEY is required when FLYWHEEL_ENV={self.flywheel_env}"
            )
        return self

    @property
    def database_dsn(self) -> str:
        """The SQLAlchemy async URL, with `postgres://` spellings normalised."""
        if self.database_url is None:
            return f"sqlite+aiosqlite:///{(self.flywheel_var_dir / 'flywheel.db').as_posix()}"
        return normalise_database_url(self.database_url.get_secret_value())

    @property
    def auth_required(self) -> bool:
        if self.flywheel_auth is not None:
            return self.flywheel_auth == "required"
        return self.flywheel_env != "dev"

    @property
    def snapshot_dir(self) -> Path:
        return self.flywheel_snapshot_dir or self.flywheel_var_dir / "snapshots"

    @property
    def files_dir(self) -> Path:
        return self.flywheel_files_dir or self.flywheel_var_dir / "files"

    @property
    def redis_dsn(self) -> str | None:
        """REDIS_URL, or the embedded server's socket when `flywheel run` started one."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        socket = self.flywheel_var_dir / "redis.sock"
        return f"unix://{socket.resolve()}" if socket.exists() else None

    @property
    def routes_path(self) -> Path | None:
        if self.flywheel_config is not None:
            return self.flywheel_config
        default = Path("flywheel.yaml")
        return default if default.is_file() else None

    def provider_key(self, env_name: str) -> SecretStr | None:
        """The secret a deployment names by `api_key_env`, from settings or the environment."""
        field = env_name.lower()
        if field in PROVIDER_KEY_FIELDS:
            value: SecretStr | None = getattr(self, field)
            return value
        raw = os.environ.get(env_name)
        return SecretStr(raw) if raw else None


def normalise_database_url(url: str) -> str:
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


def pii_kinds(value: str) -> tuple[str, ...]:
    """`FLYWHEEL_REDACT_PII`'s kinds: "email, card" -> ("email", "card")."""
    return tuple(k.strip() for k in value.split(",") if k.strip())
