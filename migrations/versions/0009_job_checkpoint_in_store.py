"""jobs.checkpoint_sha256: the digest of the job's last.pt mirrored in the object store

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 03:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "checkpoint_sha256")
