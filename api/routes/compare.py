"""Several jobs side by side as one CSV: every metric sample, or every result row, of each job named.

One job's own are ``GET /v1/jobs/{id}/metrics?format=csv`` and ``.../results?format=csv``; these
put a selection (the dashboard's compare page, ``ssql metrics A B --csv``) in one file with one
header, the union of the jobs' columns (api.csv_export).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from api import csv_export, run_data
from api.csv_export import csv_response, csv_responses
from api.deps import UNAUTHORIZED_RESPONSE, Conn, Owner
from api.schemas import JobIdStr
from persistence import api_store

router = APIRouter(prefix="/v1/compare", tags=["jobs"], responses=UNAUTHORIZED_RESPONSE)

#: the most jobs one comparison names
MAX_JOBS = 50
Jobs = Annotated[list[JobIdStr], Query(alias="job", min_length=1, max_length=MAX_JOBS,
                                       description=f"a job id; repeat for each job (1 to {MAX_JOBS}), in the order wanted")]


async def _owned(conn: Any, owner: int, ids: list[str]) -> list[Mapping[str, Any]]:
    """The owner's jobs named, in the order given (repeats dropped); 404 naming the first that is not."""
    jobs = []
    for job_id in dict.fromkeys(ids):
        row = await api_store.get_job(conn, owner, job_id)
        if row is None:
            raise HTTPException(404, f"job not found: {job_id}")
        jobs.append(row)
    return jobs


@router.get("/metrics.csv", response_class=Response,
            responses=csv_responses("every metric sample of each job: job_id, job_name, job_kind, sample_id, attempt, "
                                    "phase, epoch, step, loss, lr, images_per_s, metrics.<key>..., at"))
async def compare_metrics_csv(owner: Owner, conn: Conn, job: Jobs) -> Response:
    """Every metric sample of the jobs named (not downsampled), one CSV. Text cells that a
    spreadsheet would run as a formula (``= + - @``) start with ``'``."""
    jobs = await _owned(conn, owner, job)
    data = [(j, await run_data.all_metrics(conn, j["id"])) for j in jobs]
    return csv_response(csv_export.metrics_csv(data), f"ssql-metrics-{len(jobs)}-jobs.csv")


@router.get("/results.csv", response_class=Response,
            responses=csv_responses("every result row of each job: job_id, job_name, job_kind, method, source_job, "
                                    "pretrain_job, bits, protocol, top1, calibration, probe, quantizer, then the rows' details"))
async def compare_results_csv(owner: Owner, conn: Conn, job: Jobs) -> Response:
    """Every result row of the jobs named (top-1 per bit-width; a distill's or finetune's row), one CSV."""
    jobs = await _owned(conn, owner, job)
    data = [(j, await run_data.with_sizes(conn, owner, j, await run_data.result_rows(conn, j["id"])),
             await run_data.pretrain_method(conn, owner, j)) for j in jobs]
    return csv_response(csv_export.results_csv(data), f"ssql-results-{len(jobs)}-jobs.csv")
