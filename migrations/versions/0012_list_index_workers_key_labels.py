"""job list index for metric sorts; workers seen (status page, /metrics); a label per API key

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-07 12:00:00

* ``job_results (job_id, bits, top1)`` serves ``GET /v1/jobs?sort=top1:<bits>`` (the top-1 of each
  listed job at one bit-width) from the index alone; it replaces ``ix_job_results_job_id``, whose
  lookups it serves too (bench/list_latency.py measures the list before and after this revision).
* ``workers``: one row per Celery worker, written by the worker's presence thread
  (worker/presence.py): host, device, queues, its pool processes, last heartbeat.
* ``api_keys.label``: the owner's words for a key created from the dashboard or ``POST /v1/keys``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_job_results_job_bits_top1", "job_results", ["job_id", "bits", "top1"])
    op.drop_index("ix_job_results_job_id", table_name="job_results")
    op.add_column("api_keys", sa.Column("label", sa.String(length=100), nullable=True))
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("device", sa.String(length=200), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("processes", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_column("api_keys", "label")
    op.create_index("ix_job_results_job_id", "job_results", ["job_id"])
    op.drop_index("ix_job_results_job_bits_top1", table_name="job_results")
