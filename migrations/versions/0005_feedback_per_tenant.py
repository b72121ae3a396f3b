"""feedback keyed by request and tenant

A score given by someone other than the request's tenant must neither block nor replace
the tenant's own: each (request, tenant) keeps its own score, and readers take the one
whose tenant owns the request (or the master key's).

Revision ID: 0005_feedback_per_tenant
Revises: 0004_alerts
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_feedback_per_tenant"
down_revision: str | None = "0004_alerts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE feedback SET tenant = 'anonymous' WHERE tenant IS NULL")
    # Batch mode: SQLite cannot change a primary key in place (the table is rebuilt).
    with op.batch_alter_table("feedback", recreate="auto") as batch:
        batch.alter_column("tenant", existing_type=sa.String(length=64), nullable=False)
        batch.drop_constraint("pk_feedback", type_="primary")
        batch.create_primary_key("pk_feedback", ["request_id", "tenant"])
    op.create_index(op.f("ix_feedback_created_at"), "feedback", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_created_at"), table_name="feedback")
    # One row per request again: keep the latest score of each.
    op.execute(
        "DELETE FROM feedback WHERE EXISTS (SELECT 1 FROM feedback AS f2 WHERE "
        "f2.request_id = feedback.request_id AND (f2.updated_at > feedback.updated_at OR "
        "(f2.updated_at = feedback.updated_at AND f2.tenant > feedback.tenant)))"
    )
    with op.batch_alter_table("feedback", recreate="auto") as batch:
        batch.drop_constraint("pk_feedback", type_="primary")
        batch.create_primary_key("pk_feedback", ["request_id"])
        batch.alter_column("tenant", existing_type=sa.String(length=64), nullable=True)
