"""device_throughput: the sustained TFLOP/s the service measured per device kind (cost estimates)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 03:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_throughput",
        sa.Column("device_kind", sa.String(length=200), nullable=False),
        sa.Column("tflops", sa.Float(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_kind"),
    )


def downgrade() -> None:
    op.drop_table("device_throughput")
