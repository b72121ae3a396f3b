"""Tables, and the schema revision this code expects to find.

Later capabilities (keys, alerts, the cycle's runs and experiments, batch files) add
their own tables in their own migrations; the request row already carries the columns
they report on (tenant, variant, quality and its source).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The Alembic head this code was written for; the app refuses to start on another.
# A test keeps it equal to the head of migrations/versions.
SCHEMA_REVISION = "0007_batches"

ID = String(64)  # request/completion ids: "chatcmpl-" + 24 hex, with room
NAME = String(128)  # route, deployment, provider, model and variant names


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class WorkerHeartbeat(Base):
    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    beats: Mapped[int] = mapped_column(Integer, default=0)


class RequestRow(Base):
    """One row per request, consolidated from the Redis request stream by the workers.

    The id is the request (= chat completion) id, so a replayed batch inserts nothing new.
    """

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_created_at", "created_at"),
        Index("ix_requests_route_created_at", "route", "created_at"),
        Index("ix_requests_tenant_created_at", "tenant", "created_at"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    endpoint: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(NAME)
    deployment: Mapped[str | None] = mapped_column(NAME)
    provider: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(NAME)
    variant: Mapped[str | None] = mapped_column(NAME)
    status: Mapped[int] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    cache_tier: Mapped[str] = mapped_column(String(16), default="bypass")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    client_disconnected: Mapped[bool] = mapped_column(Boolean, default=False)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    quality_score: Mapped[float | None] = mapped_column(Float)
    quality_source: Mapped[str | None] = mapped_column(String(16))  # rules, judge, feedback
    quality_reasons: Mapped[list[str] | None] = mapped_column(JSON)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RequestBody(Base):
    """Redacted request/response bodies, only for routes that opt in; own retention."""

    __tablename__ = "request_bodies"

    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    route: Mapped[str | None] = mapped_column(NAME)
    request: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)


class Feedback(Base):
    """A score given to a past answer; one row per request and tenant (repeated feedback
    from the same caller replaces its score)."""

    __tablename__ = "feedback"

    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    # Part of the key: another tenant's score can neither block nor replace the owner's.
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    comment: Mapped[str | None] = mapped_column(Text)
    # Indexed: the alert worker reads the last hour's scores every tick.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MetricsPoint(Base):
    """One aggregation period of one route and deployment (route "*" sums them all).

    Unique per (bucket, route, deployment): a re-run of the job overwrites its point.
    """

    __tablename__ = "metrics_points"
    __table_args__ = (
        UniqueConstraint("bucket_start", "route", "deployment", name="uq_metrics_points_bucket"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    bucket_s: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(NAME)
    deployment: Mapped[str] = mapped_column(NAME)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    errors_by_class: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p50_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p95_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    cache_hits_l1: Mapped[int] = mapped_column(Integer, default=0)
    cache_hits_l2: Mapped[int] = mapped_column(Integer, default=0)
    cache_misses: Mapped[int] = mapped_column(Integer, default=0)
    quality_mean: Mapped[float | None] = mapped_column(Float)
    quality_count: Mapped[int] = mapped_column(Integer, default=0)


class Snapshot(Base):
    """A snapshot file of the learned state; the file itself lives in the snapshot dir."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the file's stem
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(80))  # "sha256:" + hex
    version: Mapped[int] = mapped_column(Integer)
    counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)


class ApiKey(Base):
    """A virtual key: only its SHA-256 and a display prefix are kept, never the secret."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    allowed_routes: Mapped[list[str] | None] = mapped_column(JSON)  # None: every route
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    budget_usd: Mapped[float | None] = mapped_column(Float)
    budget_period: Mapped[str | None] = mapped_column(String(8))  # day, week, month, total
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    key_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Alert(Base):
    """An anomaly the worker escalated: one row per (subject, kind) per cooldown.

    `subject` is "route/deployment"; `value` and `baseline` are the window's and the
    baseline's figure in the kind's unit (ms, error rate, mean score, requests).
    """

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_created_at", "created_at"),
        Index("ix_alerts_subject_created_at", "subject", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "alert_" + 24 hex
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    subject: Mapped[str] = mapped_column(String(260))
    route: Mapped[str] = mapped_column(NAME)
    deployment: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    z_score: Mapped[float] = mapped_column(Float)
    health: Mapped[float | None] = mapped_column(Float)
    value: Mapped[float] = mapped_column(Float)
    baseline: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # not_configured, pending, sent or failed
    webhook_status: Mapped[str] = mapped_column(String(32))


class CycleRun(Base):
    """One run of the virtuous cycle: what it found, what it did, and what came of what
    earlier runs did (each run measures the outcome of the actions before it)."""

    __tablename__ = "cycle_runs"
    __table_args__ = (Index("ix_cycle_runs_started_at", "started_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "run_" + 24 hex
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trigger: Mapped[str] = mapped_column(String(16))  # schedule or manual
    job_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # running, completed, failed
    routes: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # per route: stats, weights
    findings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    actions: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    outcomes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class PromptVariant(Base):
    """A system prompt (and optional sampling parameters) a route's traffic may get.

    Never deleted: a retired or rolled-back variant is kept for the record and rollback.
    """

    __tablename__ = "prompt_variants"
    __table_args__ = (Index("ix_prompt_variants_route", "route", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "var_" + 24 hex
    route: Mapped[str] = mapped_column(NAME)
    name: Mapped[str] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # candidate, testing, promoted, retired, rolled_back
    status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))  # admin or optimizer
    parent: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Experiment(Base):
    """A traffic split between a route's baseline and candidate variants, decided by a
    sequential test; after a promotion it watches the winner against the old baseline."""

    __tablename__ = "experiments"
    __table_args__ = (Index("ix_experiments_route", "route", "started_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "exp_" + 24 hex
    route: Mapped[str] = mapped_column(NAME)
    # running, watching (promoted, under watch), kept, rolled_back, retired,
    # inconclusive, stopped
    status: Mapped[str] = mapped_column(String(16))
    control: Mapped[str] = mapped_column(String(40))  # variant id, or "baseline"
    arms: Mapped[dict[str, float]] = mapped_column(JSON)  # variant → traffic share
    origin: Mapped[str] = mapped_column(String(16))  # admin or optimizer
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    winner: Mapped[str | None] = mapped_column(String(40))
    # The decision's statistics, and the old baseline's frozen for the rollback watch.
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    watch: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class CycleDecision(Base):
    """Every decision the cycle takes, with its statistics and, once measured, whether it
    did what it meant to (the success rate per route and kind steers later runs)."""

    __tablename__ = "cycle_decisions"
    __table_args__ = (Index("ix_cycle_decisions_route_kind", "route", "kind", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "dec_" + 24 hex
    run_id: Mapped[str | None] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    route: Mapped[str] = mapped_column(NAME)
    # reweight, experiment_start, promote, retire, inconclusive, rollback, keep, candidates
    kind: Mapped[str] = mapped_column(String(24))
    subject: Mapped[str | None] = mapped_column(String(64))  # experiment or variant id
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # pending until a later run measures it: success, failure (or n/a)
    outcome: Mapped[str] = mapped_column(String(16), default="pending")
    outcome_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    measured_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StoredFile(Base):
    """A file uploaded to `/v1/files` or written by a batch: its bytes live in the files
    directory (`Settings.files_dir`, under its id), its metadata here. It belongs to the
    key that uploaded it (or whose batch wrote it); `owner` None is the master key."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "file-" + 24 hex
    owner: Mapped[str | None] = mapped_column(String(64))  # key id
    purpose: Mapped[str] = mapped_column(String(32))  # batch, batch_output
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(Integer)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))  # processed, error
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """A batch of requests (`/v1/batches`), run by the workers. Its state follows
    OpenAI's (validating → in_progress → finalizing → completed, or failed, expired,
    cancelling → cancelled); `lease_*` is which worker runs it, until when."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_owner_created_at", "owner", "created_at"),
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "batch_" + 24 hex
    owner: Mapped[str | None] = mapped_column(String(64))  # key id; None: master key
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    model: Mapped[str | None] = mapped_column(NAME)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    output_expires_s: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
