"""The service itself: ``GET /v1/status`` (the dashboard's status page) and ``GET /metrics``
(Prometheus). Both read the database at request time (persistence/service_status.py).

Owner-safe: the status page names only the caller's own jobs; other owners' jobs appear as counts
(queued, running, failed attempts) and a worker busy with one shows "another owner's job".
``/metrics`` carries no job ids or owner names, only counts; it needs an API key unless
``SSQL_METRICS_PUBLIC=1`` (a Prometheus on a private network).
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.deps import (
    BEARER_SECURITY,
    UNAUTHORIZED_RESPONSE,
    Conn,
    Owner,
    SettingsDep,
    authenticate,
    bearer_key,
)
from api.metrics import exposition, service_families
from api.state import AppState
from api.views import _error_view  # the same rendering as a job's (errors without server paths)
from api.views import _ts as iso
from persistence import service_status
from persistence.db import as_utc, utcnow
from persistence.models import JOB_STATUSES
from persistence.workers import worker_state

router = APIRouter(tags=["service"])


class QueueOut(BaseModel):
    name: str
    queued: int = Field(description="queued jobs (the database's count: the queue's true depth)")
    queued_yours: int
    running: int
    broker_messages: int | None = Field(description="wake-up messages waiting in the broker (null: not readable)")


class WorkerJob(BaseModel):
    yours: bool
    id: str | None = Field(None, description="only for your own jobs")
    kind: str | None = None
    name: str | None = None


class WorkerOut(BaseModel):
    name: str
    host: str
    device: str | None
    queues: list[str]
    concurrency: int
    state: str = Field(description="up (reporting), stopped (a clean stop) or lost (its reports stopped)")
    started_at: str
    heartbeat_at: str
    heartbeat_age_s: float
    jobs: list[WorkerJob]


class AttemptOut(BaseModel):
    job_id: str
    kind: str
    name: str | None
    attempt: int
    worker: str
    started_at: str | None
    heartbeat_at: str | None = None
    progress: dict[str, Any] | None = None


class FailureOut(BaseModel):
    job_id: str
    kind: str
    name: str | None
    job_status: str
    attempt: int
    worker: str
    outcome: str
    ended_at: str | None
    error: dict[str, Any] | None


class StatusOut(BaseModel):
    time: str
    queues: list[QueueOut]
    jobs: dict[str, dict[str, int]] = Field(description="`all` owners' and `yours`: state -> jobs")
    workers: list[WorkerOut]
    running: list[AttemptOut] = Field(description="your running attempts")
    running_others: int = Field(description="running attempts of other owners")
    failures: list[FailureOut] = Field(description="your attempts that failed in the window, newest first")
    failures_others: int
    failures_window_hours: float


async def snapshot(state: AppState, conn: Any) -> dict[str, Any]:
    """Everything both routes show, read once: jobs by state, queues, running attempts, workers."""
    settings, now = state.settings, utcnow()
    by_state = await service_status.jobs_by_state(conn)
    workers = await service_status.workers_seen(conn, now)
    running = await service_status.running_attempts(conn)
    queue_names = sorted({settings.queue, *(q for w in workers for q in (w["queues"] or []))})
    broker = await service_status.broker_depth(settings, queue_names)
    busy = Tally(r["worker"] for r in running)
    shown = []
    for w in workers:
        processes = set(w["processes"] or [])
        shown.append({**w, "state": worker_state(w["stopped_at"], w["heartbeat_at"], settings, now), "heartbeat_ts": as_utc(w["heartbeat_at"]).timestamp(),
                      "running_jobs": sum(busy[p] for p in processes), "running": [r for r in running if r["worker"] in processes]})
    jobs: dict[tuple[str, str], int] = {}
    for r in by_state:
        jobs[(r["status"], r["kind"])] = jobs.get((r["status"], r["kind"]), 0) + int(r["n"])
    queued = sum(n for (st, _k), n in jobs.items() if st == "queued")
    running_n = sum(n for (st, _k), n in jobs.items() if st == "running")
    # every job is published to the API's queue (SSQL_QUEUE); other queues a worker consumes hold none of ours
    queues = [{"name": q, "queued": queued if q == settings.queue else 0, "running": running_n if q == settings.queue else 0,
               "broker_messages": broker.get(q)} for q in queue_names]
    return {"now": now, "by_state": by_state, "jobs": jobs, "queues": queues, "workers": shown, "running": len(running),
            "running_rows": running, "outcomes": await service_status.attempt_outcomes(conn)}


@router.get("/v1/status", response_model=StatusOut, responses=UNAUTHORIZED_RESPONSE)
async def service_status_route(
    request: Request, owner: Owner, conn: Conn, settings: SettingsDep,
    failures_hours: Annotated[float, Query(gt=0, le=24 * 30, description="the window of recent failures, in hours")] = 24.0,
) -> JSONResponse:
    """Queue depth per queue, workers seen (host, device, current job, last heartbeat), running
    attempts and recent failures. Your own jobs are named; other owners' only counted."""
    snap = await snapshot(request.app.state.ssql, conn)
    now = snap["now"]
    yours: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)
    everyone: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)
    for r in snap["by_state"]:
        everyone[r["status"]] = everyone.get(r["status"], 0) + int(r["n"])
        if r["owner_id"] == owner:
            yours[r["status"]] = yours.get(r["status"], 0) + int(r["n"])
    queues = [{**q, "queued_yours": yours["queued"] if q["name"] == settings.queue else 0} for q in snap["queues"]]

    def job_ref(r: Any) -> dict[str, Any]:
        mine = r["owner_id"] == owner
        return {"yours": mine, "id": r["job_id"] if mine else None, "kind": r["kind"] if mine else None,
                "name": r["name"] if mine else None}

    workers = [{
        "name": w["name"], "host": w["host"], "device": w["device"], "queues": w["queues"] or [], "concurrency": w["concurrency"],
        "state": w["state"], "started_at": iso(w["started_at"]), "heartbeat_at": iso(w["heartbeat_at"]),
        "heartbeat_age_s": round(max(0.0, (now - as_utc(w["heartbeat_at"])).total_seconds()), 1),
        "jobs": [job_ref(r) for r in w["running"]],
    } for w in snap["workers"]]  # fmt: skip
    mine = [r for r in snap["running_rows"] if r["owner_id"] == owner]
    running = [{"job_id": r["job_id"], "kind": r["kind"], "name": r["name"], "attempt": r["attempt"], "worker": r["worker"],
                "started_at": iso(r["started_at"]), "heartbeat_at": iso(r["heartbeat_at"]), "progress": r["progress"]}
               for r in mine]  # fmt: skip
    failed, failed_others = await service_status.recent_failures(conn, failures_hours, owner, 50)
    failures = [{"job_id": r["job_id"], "kind": r["kind"], "name": r["name"], "job_status": r["status"], "attempt": r["attempt"],
                 "worker": r["worker"], "outcome": r["outcome"], "ended_at": iso(r["ended_at"]), "error": _error_view(r["error"])}
                for r in failed]  # fmt: skip
    return JSONResponse({
        "time": iso(now), "queues": queues, "jobs": {"all": everyone, "yours": yours}, "workers": workers,
        "running": running, "running_others": len(snap["running_rows"]) - len(mine),
        "failures": failures, "failures_others": failed_others, "failures_window_hours": failures_hours,
    })  # fmt: skip


METRICS_DESCRIPTION = (
    "Prometheus text format: request counts and latency histograms per route template, jobs by state, queue depth, "
    "running attempts, attempt outcomes, workers' heartbeats. Needs an API key (`Authorization: Bearer`) unless the "
    "server sets `SSQL_METRICS_PUBLIC=1`."
)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}, "description": "the metrics"},
               **UNAUTHORIZED_RESPONSE},
    openapi_extra=BEARER_SECURITY,
    description=METRICS_DESCRIPTION,
)
async def metrics(request: Request, conn: Conn) -> Response:
    """The service's metrics for Prometheus."""
    state: AppState = request.app.state.ssql
    if not state.settings.metrics_public:
        await authenticate(state, bearer_key(request.headers.get("authorization")))
    snap = await snapshot(state, conn)
    return Response(exposition(service_families(snap)), media_type="text/plain; version=0.0.4; charset=utf-8")
