"""datasets.source_uri (a dataset registered from s3://...), sha256 unknown while it validates

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("source_uri", sa.String(length=1024), nullable=True))
        batch.alter_column("sha256", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM datasets WHERE sha256 IS NULL")  # registrations still validating: they have no content yet
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("sha256", existing_type=sa.String(length=64), nullable=False)
        batch.drop_column("source_uri")
