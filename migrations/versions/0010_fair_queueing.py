"""fair queueing: jobs.priority (an owner's own order), owner_quotas.weight (fair-share weight)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("owner_quotas", sa.Column("weight", sa.Float(), nullable=True))
    # the fair-share usage reads the attempts that ended recently (or are still open)
    op.create_index("ix_job_attempts_ended_at", "job_attempts", ["ended_at"])


def downgrade() -> None:
    op.drop_index("ix_job_attempts_ended_at", table_name="job_attempts")
    op.drop_column("owner_quotas", "weight")
    op.drop_column("jobs", "priority")
