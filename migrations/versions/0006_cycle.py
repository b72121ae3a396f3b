"""the virtuous cycle: runs, prompt variants, experiments and decisions

Revision ID: 0006_cycle
Revises: 0005_feedback_per_tenant
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_cycle"
down_revision: str | None = "0005_feedback_per_tenant"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
ID = sa.String(length=40)
NAME = sa.String(length=128)


def upgrade() -> None:
    op.create_table(
        "cycle_runs",
        sa.Column("id", ID, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("routes", sa.JSON(), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=True),
        sa.Column("actions", sa.JSON(), nullable=True),
        sa.Column("outcomes", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cycle_runs")),
    )
    op.create_index("ix_cycle_runs_started_at", "cycle_runs", ["started_at"])
    op.create_table(
        "prompt_variants",
        sa.Column("id", ID, nullable=False),
        sa.Column("route", NAME, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("parent", ID, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_variants")),
    )
    op.create_index("ix_prompt_variants_route", "prompt_variants", ["route", "created_at"])
    op.create_table(
        "experiments",
        sa.Column("id", ID, nullable=False),
        sa.Column("route", NAME, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("control", ID, nullable=False),
        sa.Column("arms", sa.JSON(), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("winner", ID, nullable=True),
        sa.Column("decision", sa.JSON(), nullable=True),
        sa.Column("watch", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
    )
    op.create_index("ix_experiments_route", "experiments", ["route", "started_at"])
    op.create_table(
        "cycle_decisions",
        sa.Column("id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("route", NAME, nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("outcome_stats", sa.JSON(), nullable=True),
        sa.Column("measured_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cycle_decisions")),
    )
    op.create_index(op.f("ix_cycle_decisions_run_id"), "cycle_decisions", ["run_id"])
    op.create_index(
        "ix_cycle_decisions_route_kind", "cycle_decisions", ["route", "kind", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_cycle_decisions_route_kind", table_name="cycle_decisions")
    op.drop_index(op.f("ix_cycle_decisions_run_id"), table_name="cycle_decisions")
    op.drop_table("cycle_decisions")
    op.drop_index("ix_experiments_route", table_name="experiments")
    op.drop_table("experiments")
    op.drop_index("ix_prompt_variants_route", table_name="prompt_variants")
    op.drop_table("prompt_variants")
    op.drop_index("ix_cycle_runs_started_at", table_name="cycle_runs")
    op.drop_table("cycle_runs")
