"""Job routes: submit (idempotent), status, list, cancel, metrics, results."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api import csv_export, run_data, uploads
from api.csv_export import csv_response, csv_responses
from api.deps import (
    BEARER_SECURITY,
    UNAUTHORIZED_RESPONSE,
    Conn,
    JobId,
    Owner,
    SettingsDep,
    StateDep,
    authenticate,
    bearer_key,
)
from api.downsample import downsample
from api.errors import FieldError, FieldErrors
from api.head import is_head
from api.json_body import Utf8JsonRoute
from api.limits import TOO_LARGE_RESPONSE
from api.schemas import (
    MAX_TAGS,
    ExportRequest,
    JobOut,
    JobPage,
    JobPatch,
    JobRequest,
    MetricPage,
    ResultsOut,
    Tag,
)
from api.specs import (
    check_json_values,
    distill_spec,
    eval_spec,
    export_spec,
    finetune_spec,
    pretrain_spec,
)
from api.state import AppState
from api.views import job_view, metric_view
from persistence import api_store, quotas, throughput
from persistence.models import JOB_KINDS, JOB_STATUSES, TERMINAL_STATUSES
from persistence.queue import publish_job

log = logging.getLogger("ssql.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED_RESPONSE, route_class=Utf8JsonRoute)

NOT_FOUND = "job not found"
_KINDS = JOB_KINDS
EVENTS_POLL_S = 0.5
#: what one status event carries: enough to redraw a job's row (the times too, so a page
#: that loaded a queued job can show how long it has run)
EVENT_FIELDS = ("id", "status", "progress", "attempts", "max_attempts", "error", "cancel_requested",
                "started_at", "finished_at", "updated_at")
#: the largest offset / metric id a query may name (Postgres BIGINT); above it: 422, not a 500
MAX_BIGINT = 2**63 - 1


#: the quota answers of the routes that queue a job (persistence.quotas, decision 014)
QUOTA_RESPONSES: dict[int | str, dict[str, Any]] = {
    429: {"description": "Over the quota `max_active_jobs` (queued + running jobs): nothing was queued. Body: "
          "`{detail, code: quota_exceeded, quota, limit, usage, frees_at, retry_after_s}`; `Retry-After` header"},
    403: {"description": "The compute budget (`device_hours` per rolling period) is used up, or the job asks for "
          "more devices than the quota `max_devices`: nothing was queued. Body: `{detail, code: quota_forbidden, "
          "quota, limit, usage, frees_at, retry_after_s}`"},
}


def _request_hash(raw: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={
        200: {"description": "Replay of an earlier submission with the same Idempotency-Key (a job), or the answer "
              "of `?dry_run=1` (`{dry_run, kind, spec, estimate, quota}`)"},
        409: {"description": "The Idempotency-Key was used with a different body"},
        422: {"description": "Invalid field: `detail[].loc` names it, `detail[].msg` says why; also a job whose "
              "estimate exceeds the server's limits (device-hours per job, device memory)"},
        **TOO_LARGE_RESPONSE,
        **QUOTA_RESPONSES,
    },
)
async def submit_job(
    body: JobRequest,
    owner: Owner,
    conn: Conn,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    dry_run: Annotated[bool, Query(description="validate and estimate only: 200 with `{dry_run, kind, spec, estimate, "
                                   "quota}` (quota: the refusal a submission would get now, or null); nothing is queued")] = False,
) -> JSONResponse:
    """Create a job (status ``queued``). It is committed before it is published to the queue.
    Its ``spec.estimate`` is the cost estimated from the spec (``device_hours``, ``peak_memory_gb``,
    ``pflops``); a job over the server's ``SSQL_MAX_JOB_DEVICE_HOURS`` or device memory is a 422."""
    # an explicit null of a declared field is its default, as the schema states (``"method": null``
    # was refused as "unknown method None"); method options (extra fields) keep their null
    declared = type(body).model_fields
    raw = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None or k not in declared}
    check_json_values(raw)
    request_hash = _request_hash(raw)
    if idempotency_key is not None:
        existing = await api_store.find_by_idempotency_key(conn, owner, idempotency_key)
        if existing is not None:
            return _replay_or_conflict(existing, request_hash)
    labels = _labels(raw)
    settings = state.settings
    source_job_id = None
    swapped = await uploads.stand_in(conn, owner, raw)
    if raw["kind"] == "pretrain":
        spec = pretrain_spec(raw, settings)
    elif raw["kind"] == "eval":
        source_job_id = raw["source_job"]
        source = await _succeeded_source(conn, owner, source_job_id, "pretrain")
        spec = eval_spec(raw, settings, source["spec"]["config"]["dataset"], source["spec"]["config"])
        await _pin_inputs(conn, spec, source_job_id, None)
    elif raw["kind"] == "finetune":
        source_job_id = raw["source_job"]
        source = await _succeeded_source(conn, owner, source_job_id, "pretrain")
        spec = finetune_spec(raw, settings, source["spec"]["config"]["dataset"])
        await _pin_inputs(conn, spec, source_job_id, None)
    else:
        source_job_id = raw["source_job"]
        source = await _succeeded_source(conn, owner, source_job_id, "eval")
        spec = distill_spec(raw, settings, source)
        await _pin_inputs(conn, spec, spec["pretrain_job"], source_job_id)
    upload_images = await uploads.restore(conn, owner, spec, swapped)
    arch = None if raw["kind"] == "pretrain" else await _pretrain_config(conn, owner, raw["kind"], source)
    estimate = await _estimate_or_refuse(conn, settings, raw["kind"], spec, arch, upload_images)
    if dry_run:
        refusal = await quotas.submission_check(conn, owner, settings, quotas.job_devices(raw["kind"], spec))
        return JSONResponse({"dry_run": True, "kind": raw["kind"], "spec": spec, "estimate": estimate,
                             "quota": None if refusal is None else refusal.body()})  # fmt: skip
    if estimate is not None:
        spec["estimate"] = estimate
    return await _create_and_publish(conn, state, owner, raw["kind"], spec, source_job_id, idempotency_key, request_hash,
                                     labels=labels)


#: the job's labels (not part of its spec): name, tags, notes, and its priority among the owner's jobs
LABELS = ("name", "tags", "notes", "priority")


def _labels(raw: dict[str, Any]) -> dict[str, Any]:
    """Take the labels out of a request body (validated by the schema); tags lose repeats, keep their order."""
    labels = {k: raw.pop(k) for k in LABELS if k in raw}
    if labels.get("tags") is not None:
        labels["tags"] = list(dict.fromkeys(labels["tags"]))
    return labels


async def _pretrain_config(conn: Any, owner: int, kind: str, source: Any) -> dict[str, Any] | None:
    """The pretrain config whose backbone a job of ``kind`` runs (its source, or its source's source)."""
    if kind in ("eval", "finetune"):
        return source["spec"]["config"]
    pretrain = await api_store.source_job(conn, owner, source["source_job_id"]) if source["source_job_id"] else None
    return None if pretrain is None else pretrain["spec"]["config"]


async def _estimate_or_refuse(conn: Any, settings: Any, kind: str, spec: dict[str, Any],
                              arch: dict[str, Any] | None, upload_images: int | None = None) -> dict[str, Any] | None:
    """The job's cost estimate (``ssql_core.cost``) as stored on the job; a 422 when it is over the
    server's ``SSQL_MAX_JOB_DEVICE_HOURS`` or ``SSQL_MAX_DEVICE_MEMORY_GB`` (decision 014). The
    device throughput is the slowest kind the service measured (``device_throughput``), else the
    ``SSQL_DEVICE_TFLOPS`` prior."""
    from ssql_core.cost import estimate as cost_estimate
    from ssql_core.methods import METHODS

    config = spec["config"]
    if upload_images:  # an uploaded dataset: its image count is known (decision 018)
        config = {**config, "max_samples": min(config.get("max_samples") or upload_images, upload_images)}
    if kind != "pretrain" and arch is None:
        return None
    method = METHODS.get(config.get("method", "")) if kind == "pretrain" else None
    quantized = bool(getattr(method, "quantized", True))
    slowest = await throughput.slowest_measured(conn)
    device_kind, tflops = slowest if slowest is not None else ("prior (SSQL_DEVICE_TFLOPS)", settings.device_tflops)
    try:
        est = await anyio.to_thread.run_sync(lambda: cost_estimate(kind, config, tflops, arch, quantized))
    except Exception:  # noqa: BLE001 - an estimate must never turn a valid job into a 500
        log.warning("no cost estimate for a %s job", kind, exc_info=True)
        return None
    if est is None:
        return None
    problems = []  # both limits named at once when both are passed
    if settings.max_job_device_hours is not None and est.device_hours > settings.max_job_device_hours:
        problems.append(FieldError(("body", "epochs"), f"this job is estimated at {est.device_hours:.1f} device-hours "
                        f"({est.pflops:.1f} PFLOP at {est.device_tflops:g} TFLOP/s per device), above this server's "
                        f"limit of {settings.max_job_device_hours:g} per job: fewer epochs, images, a smaller image "
                        "size or backbone"))  # fmt: skip
    if settings.max_device_memory_gb is not None and est.peak_memory_gb > settings.max_device_memory_gb:
        problems.append(FieldError(("body", "batch_size"), f"this job needs about {est.peak_memory_gb:.1f} GB per "
                        f"device, above the largest device's {settings.max_device_memory_gb:g} GB: a smaller "
                        "batch_size (per device), image size or backbone, or more devices"))  # fmt: skip
    if problems:
        raise problems[0] if len(problems) == 1 else FieldErrors(problems)
    return {**est.as_dict(), "device_kind": device_kind}


async def _succeeded_source(conn: Any, owner: int, job_id: str, kind: str) -> Any:
    """The request's ``source_job``: one of the owner's jobs of ``kind`` that succeeded (422 otherwise)."""
    source = await api_store.source_job(conn, owner, job_id)
    if source is None or source["kind"] != kind:
        raise FieldError(("body", "source_job"), f"no {kind} job {job_id!r} of yours")
    if source["status"] != "succeeded":
        raise FieldError(("body", "source_job"), f"the {kind} job has not succeeded (status: {source['status']})")
    return source


async def _pin_inputs(conn: Any, spec: dict[str, Any], pretrain_job: str | None, eval_job: str | None) -> None:
    """Put the registered sha256 of the server files the job will read (the pretrain's ``last.pt``,
    the eval's ``heads.pt``) into its config as ``input_sha256``: the runner verifies each file
    against it before reading it and fails the job with ``corrupt_artifact`` on a mismatch
    (docs/decisions/011). Sources that finished before files were registered have none: unchecked."""
    pinned: dict[str, str] = {}
    if pretrain_job is not None and (digest := (await api_store.input_digests(conn, pretrain_job)).get("last.pt")):
        pinned["checkpoint"] = digest
    if eval_job is not None and (digest := (await api_store.input_digests(conn, eval_job)).get("heads.pt")):
        pinned["heads"] = digest
    if pinned:
        spec["config"]["input_sha256"] = pinned


async def _create_and_publish(
    conn: Any,
    state: AppState,
    owner: int,
    kind: str,
    spec: dict[str, Any],
    source_job_id: str | None,
    idempotency_key: str | None,
    request_hash: str,
    status_code: int = 201,
    labels: dict[str, Any] | None = None,
) -> JSONResponse:
    """Commit a queued job, then publish it (the reconciler republishes if publishing fails).
    Over one of the owner's quotas nothing is queued: 429 (or 403), naming the quota."""
    settings = state.settings
    refusal = await quotas.submission_check(conn, owner, settings, quotas.job_devices(kind, spec))
    if refusal is not None:
        return JSONResponse(refusal.body(), status_code=refusal.status, headers={"Retry-After": str(refusal.retry_after_s)})
    try:
        job, created = await api_store.create_job(
            conn,
            job_id=str(uuid.uuid4()),
            owner_id=owner,
            kind=kind,
            spec=spec,
            source_job_id=source_job_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            labels=labels,
            max_attempts=settings.max_attempts,
        )
    except api_store.IdempotencyConflict:
        raise HTTPException(409, "this Idempotency-Key was already used with a different request body") from None
    if not created:
        return _replay_or_conflict(job, request_hash)
    try:
        await anyio.to_thread.run_sync(publish_job, state.celery, job["id"], settings.queue)
    except Exception:  # noqa: BLE001 - the row is committed; the reconciler publishes it later
        log.exception("could not publish job %s; the reconciler will retry", job["id"])
        await api_store.mark_unpublished(conn, job["id"])
    return JSONResponse(job_view(job), status_code=status_code, headers={"Location": f"/v1/jobs/{job['id']}"})


@router.post(
    "/{job_id}/exports",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"description": "Replay of an earlier request with the same Idempotency-Key", "model": JobOut},
        404: {"description": NOT_FOUND},
        409: {"description": "The job has not succeeded (yet), or the Idempotency-Key was used with another body"},
        422: {"description": "Invalid bits or formats: `detail[].loc` names the field"},
        **TOO_LARGE_RESPONSE,
        **QUOTA_RESPONSES,
    },
)
async def export_job(
    job_id: JobId,
    body: ExportRequest,
    owner: Owner,
    conn: Conn,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JSONResponse:
    """Queue an ``export`` job writing a succeeded pretrain (or eval) job's checkpoint at more
    bit-widths and formats. The files are served under *this* job's id (``/checkpoints``) once
    the export job succeeds; from an eval job they are classifiers (backbone + its linear head)."""
    declared = ExportRequest.model_fields  # an explicit null of a declared field is its default
    given = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None or k not in declared}
    raw = {**given, "source_job": job_id, "kind": "export"}
    check_json_values({k: v for k, v in raw.items() if k not in ("source_job", "kind")})
    if not api_store.is_job_id(job_id):
        raise HTTPException(404, NOT_FOUND)
    request_hash = _request_hash(raw)
    if idempotency_key is not None:
        existing = await api_store.find_by_idempotency_key(conn, owner, idempotency_key)
        if existing is not None:
            return _replay_or_conflict(existing, request_hash)
    source = await api_store.source_job(conn, owner, job_id)
    if source is None:
        raise HTTPException(404, NOT_FOUND)
    if source["kind"] not in ("pretrain", "eval", "finetune"):
        raise HTTPException(409, f"only pretrain, eval and finetune jobs have checkpoints to export; this is a {source['kind']} job")
    if source["status"] != "succeeded":
        raise HTTPException(409, f"the job has not succeeded (status: {source['status']}); export once it has")
    pretrain_config, evaluated = source["spec"]["config"], None
    if source["kind"] == "eval":
        pretrain = await api_store.source_job(conn, owner, source["source_job_id"])
        pretrain_config = None if pretrain is None else pretrain["spec"]["config"]
        evaluated = [r["bits"] for r in await api_store.results(conn, job_id)]  # per-layer maps by their label
    width = None if pretrain_config is None else pretrain_config.get("width")
    labels = _labels(raw)
    spec = export_spec({k: v for k, v in raw.items() if k not in ("kind", "source_job")}, source, width,
                       pretrain_config if source["kind"] != "finetune" else None, evaluated)
    if source["kind"] == "finetune":  # reads the fine-tuned classifier, not the pretrain's last.pt
        if digest := (await api_store.input_digests(conn, job_id)).get("finetuned.pt"):
            spec["config"]["input_sha256"] = {"checkpoint": digest}
    else:
        await _pin_inputs(conn, spec, spec["pretrain_job"], job_id if source["kind"] == "eval" else None)
    return await _create_and_publish(conn, state, owner, "export", spec, job_id, idempotency_key, request_hash, 202, labels)


def _replay_or_conflict(existing: Any, request_hash: str) -> JSONResponse:
    if existing["request_hash"] != request_hash:
        raise HTTPException(409, "this Idempotency-Key was already used with a different request body")
    return JSONResponse(job_view(existing), status_code=200, headers={"Idempotent-Replayed": "true"})


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses={401: {"description": "missing or invalid API key"}, 404: {"description": NOT_FOUND}},
    openapi_extra=BEARER_SECURITY,
)
async def get_job(job_id: JobId, request: Request) -> JSONResponse:
    """Status, progress (fraction, epoch, step, images/s, ETA), attempts and error of a job.

    The most frequent request: it authenticates inline and reads through prepared statements,
    with no dependency graph to solve.
    """
    state: AppState = request.app.state.ssql
    owner = await authenticate(state, bearer_key(request.headers.get("authorization")))
    row = await state.reads.get_job(owner, job_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    return JSONResponse(job_view(row))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"description": "Server-Sent Events: one `status` event per change (status, progress, attempts, error, times)", "content": {"text/event-stream": {}}},
               404: {"description": NOT_FOUND}},
)  # fmt: skip
async def job_events(job_id: JobId, owner: Owner, state: StateDep, request: Request) -> Response:
    """Live status and progress as Server-Sent Events; the stream ends when the job does."""
    if await state.reads.get_job(owner, job_id) is None:
        raise HTTPException(404, NOT_FOUND)
    if is_head(request):  # the headers of the stream, without starting it
        return Response(media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            row = await state.reads.get_job(owner, job_id)
            if row is None:
                return
            view = job_view(row)
            payload = json.dumps({k: view[k] for k in EVENT_FIELDS})
            if payload != last:
                last = payload
                yield f"event: status\ndata: {payload}\n\n"
            if view["status"] in TERMINAL_STATUSES:
                return
            await anyio.sleep(EVENTS_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


#: the job list's query parameters; any other is a 422 naming it (a typo must not list everything)
LIST_PARAMS = {"status", "state", "kind", "method", "dataset", "tag", "q", "sort", "limit", "offset"}
SORT_HELP = ("a column: created_at (default, newest first), updated_at, started_at, finished_at, name, kind, "
             "status, or top1:<bits> (a result's top-1, e.g. top1:4w4a); '-' before it: descending "
             "(created_at and top1 are descending unless prefixed '+')")
_TOP1_SORT = re.compile(r"^top1:(fp|[2-8]w[2-8]a)$")
#: what ``sort`` may be, as the schema states it (so a schema-valid value is never refused)
SORT_PATTERN = (r"^[+-]?(created_at|updated_at|started_at|finished_at|name|kind|status|top1:(fp|[2-8]w[2-8]a))$")
#: filter text: no control characters
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def _parse_sort(sort: str) -> tuple[str, bool, str | None]:
    """``sort=`` -> (column, descending, bits of a top-1 sort or None); 422 naming ``sort`` otherwise."""
    sign, name = (sort[0], sort[1:]) if sort[:1] in ("+", "-") else ("", sort)
    descending = sign == "-" or (sign == "" and (name == "created_at" or name.startswith("top1:")))
    if m := _TOP1_SORT.match(name):
        return "created_at", descending, m[1]
    if name not in api_store.SORT_COLUMNS:
        raise FieldError(("query", "sort"), f"must be {SORT_HELP}; got {sort!r}")
    return name, descending, None


@router.get("", response_model=JobPage, responses={422: {"description": "An unknown parameter or a bad value: `detail[].loc` names it"}})
async def list_jobs(
    request: Request,
    owner: Owner,
    conn: Conn,
    settings: SettingsDep,
    status: Annotated[str | None, Query(description=f"one of {', '.join(JOB_STATUSES)}",
                                        json_schema_extra={"enum": list(JOB_STATUSES)})] = None,
    state: Annotated[str | None, Query(description="the same as status", json_schema_extra={"enum": list(JOB_STATUSES)})] = None,
    kind: Annotated[str | None, Query(description=f"one of {', '.join(_KINDS)}", json_schema_extra={"enum": list(_KINDS)})] = None,
    method: Annotated[str | None, Query(max_length=64, pattern=TEXT_PATTERN, description="the spec's method (pretrain jobs), e.g. ssql")] = None,
    dataset: Annotated[str | None, Query(max_length=200, pattern=TEXT_PATTERN, description="the spec's dataset")] = None,
    tag: Annotated[list[Tag] | None, Query(description="jobs with this tag; repeat for jobs with all of them")] = None,
    q: Annotated[str | None, Query(max_length=200, pattern=TEXT_PATTERN,
                                   description="text in the name or notes, or the id's start (case-insensitive)")] = None,
    sort: Annotated[str, Query(max_length=40, pattern=SORT_PATTERN, description=SORT_HELP)] = "created_at",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
) -> JSONResponse:
    """Your jobs matching every filter given, newest first unless ``sort`` says otherwise; pass
    ``next_offset`` back as ``offset`` for the next page."""
    unknown = sorted(set(request.query_params) - LIST_PARAMS)
    if unknown:
        raise FieldError(("query", unknown[0]), f"unknown parameter; accepted: {sorted(LIST_PARAMS)}")
    if status is not None and state is not None and status != state:  # both apply: no job is in two states
        return JSONResponse({"items": [], "next_offset": None})
    status = status if status is not None else state
    if status is not None and status not in JOB_STATUSES:
        raise FieldError(("query", "status" if state is None else "state"), f"must be one of {list(JOB_STATUSES)}, got {status!r}")
    if kind is not None and kind not in _KINDS:
        raise FieldError(("query", "kind"), f"must be one of {list(_KINDS)}, got {kind!r}")
    if len(tag or []) > MAX_TAGS:
        raise FieldError(("query", "tag"), f"at most {MAX_TAGS} tags, got {len(tag or [])}")
    column, descending, metric_bits = _parse_sort(sort)
    limit = min(limit, settings.page_size_max)
    rows = await api_store.list_jobs(conn, owner, status, kind, limit + 1, offset, method=method, dataset=dataset,
                                     tags=tag, q=q or None, sort=column, descending=descending, metric_bits=metric_bits)
    next_offset = offset + limit if len(rows) > limit else None
    return JSONResponse({"items": [job_view(r) for r in rows[:limit]], "next_offset": next_offset})


@router.patch(
    "/{job_id}",
    response_model=JobOut,
    responses={404: {"description": NOT_FOUND}, 422: {"description": "A bad name, tag or notes, or an unknown field: `detail[].loc` names it"}},
)
async def update_job(job_id: JobId, body: JobPatch, owner: Owner, conn: Conn) -> JSONResponse:
    """Set the job's name, tags, notes or priority (the fields given; ``null`` clears name or notes
    and sets the priority back to 0, ``[]`` clears the tags). The spec and the results never change."""
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if k in LABELS}
    if changes.get("tags") is None and "tags" in changes:
        changes["tags"] = []
    if changes.get("tags"):
        changes["tags"] = list(dict.fromkeys(changes["tags"]))
    if "priority" in changes and changes["priority"] is None:
        changes["priority"] = 0
    if not changes:
        row = await api_store.get_job(conn, owner, job_id)
    else:
        row = await api_store.update_labels(conn, owner, job_id, changes)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    return JSONResponse(job_view(row))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={404: {"description": NOT_FOUND}, 409: {"description": "The job already finished"}},
)
async def cancel_job(job_id: JobId, owner: Owner, conn: Conn) -> JSONResponse:
    """Queued: cancelled now. Running: the worker stops the training process within seconds."""
    row = await api_store.get_job(conn, owner, job_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    if row["status"] in ("succeeded", "failed"):
        raise HTTPException(409, f"the job already finished (status: {row['status']})")
    row = await api_store.request_cancel(conn, owner, job_id)
    assert row is not None
    return JSONResponse(job_view(row), status_code=202)


@router.get("/{job_id}/metrics", response_model=MetricPage,
            responses={**csv_responses("`format=csv`: every sample after `after` (job_id, job_name, job_kind, sample_id, "
                                       "attempt, phase, epoch, step, loss, lr, images_per_s, metrics.<key>..., at)"),
                       404: {"description": NOT_FOUND}})
async def job_metrics(
    job_id: JobId,
    owner: Owner,
    conn: Conn,
    after: Annotated[int, Query(ge=0, le=MAX_BIGINT, description="return samples with id above this")] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    max_points: Annotated[int | None, Query(ge=2, le=100_000, description=(
        "the whole history after `after` in at most this many samples (`limit` is not used): every line's first and "
        "last sample and each series' smallest and largest value per bucket are kept (min/max downsampling); "
        "`downsampled_from` says how many samples they stand for"))] = None,
    fmt: Annotated[Literal["json", "csv"], Query(alias="format", description="csv: every sample after `after`, "
                                                 "not paged nor downsampled, as CSV")] = "json",
) -> Response:
    """Loss, learning rate and images/s history, oldest first (pass ``next_after`` to continue;
    ``max_points`` for a chart-sized answer; ``format=csv`` for all of it as a file)."""
    job = await api_store.get_job(conn, owner, job_id)
    if job is None:
        raise HTTPException(404, NOT_FOUND)
    if fmt == "csv":
        rows = await run_data.all_metrics(conn, job_id, after)
        return csv_response(csv_export.metrics_csv([(job, rows)]), f"{job_id}-metrics.csv")
    if max_points is not None:
        rows = await run_data.all_metrics(conn, job_id, after)
        kept = downsample(rows, max_points)
        return JSONResponse({"items": [metric_view(r) for r in kept], "next_after": None, "downsampled_from": len(rows)})
    rows = await api_store.metrics(conn, job_id, after, limit)
    next_after = rows[-1]["id"] if len(rows) == limit else None
    return JSONResponse({"items": [metric_view(r) for r in rows], "next_after": next_after})


@router.get("/{job_id}/results", response_model=ResultsOut,
            responses={**csv_responses("`format=csv`: the rows with the job's id, name, kind, pretraining method, "
                                       "calibration, probe and quantizer on each"), 404: {"description": NOT_FOUND}})
async def job_results(
    job_id: JobId,
    owner: Owner,
    conn: Conn,
    fmt: Annotated[Literal["json", "csv"], Query(alias="format", description="csv: the rows as CSV")] = "json",
) -> Response:
    """An eval job's rows, one per bit-width (bits, protocol, top1 and the run's details), or a
    distill job's row (protocol ``sqakd``: top1, ptq_top1, teacher_top1, quantizer, KL, ...)."""
    row = await api_store.get_job(conn, owner, job_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    out = await run_data.with_sizes(conn, owner, row, await run_data.result_rows(conn, job_id))
    if fmt == "csv":
        method = await run_data.pretrain_method(conn, owner, row)
        return csv_response(csv_export.results_csv([(row, out, method)]), f"{job_id}-results.csv")
    return JSONResponse({"job_id": job_id, "status": row["status"], "rows": out})
