"""What the chart, CSV and compare routes read of a job: every metric sample, its result rows as
the API answers them, and the pretraining method they came from (owner-scoped)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence import api_store

#: metric rows read per query while collecting a whole history
CHUNK = 5000


async def all_metrics(conn: AsyncConnection, job_id: str, after: int = 0) -> list[RowMapping]:
    """Every metric sample of the job with an id above ``after``, oldest first."""
    out: list[RowMapping] = []
    while True:
        rows = await api_store.metrics(conn, job_id, after, CHUNK)
        out += rows
        if len(rows) < CHUNK:
            return out
        after = rows[-1]["id"]


async def result_rows(conn: AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    """The job's result rows as ``GET /v1/jobs/{id}/results`` answers them."""
    return [{**r["row"], "bits": r["bits"], "protocol": r["protocol"], "top1": r["top1"]} for r in await api_store.results(conn, job_id)]


async def pretrain_method(conn: AsyncConnection, owner: int, job: Mapping[str, Any]) -> str | None:
    """The pretraining method of the pretrain job ``job`` is (or was made from)."""
    spec = job.get("spec") or {}
    if job["kind"] == "pretrain":
        return (spec.get("config") or {}).get("method")
    pretrain_id = spec.get("pretrain_job") or (job.get("source_job_id") if job["kind"] in ("eval", "finetune") else None)
    if pretrain_id is None:
        return None
    pretrain = await api_store.source_job(conn, owner, pretrain_id)
    return None if pretrain is None else ((pretrain["spec"] or {}).get("config") or {}).get("method")
