"""jobs.claims: the lease token, counted apart from the attempts spent (a handed-back attempt is free)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))
    # every claim so far spent an attempt: the running attempts keep their token
    op.execute("UPDATE jobs SET claims = attempts")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("claims")
