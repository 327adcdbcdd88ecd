"""Dataset routes: upload an image-folder archive (streamed), list, show, delete (decision 018).

The body is streamed to a temporary file part by part while its sha256 is computed (never held
in memory); the archive is then checked off the request path (a background step of this process)
and, when it is good, stored in the object store. ``"dataset": "upload:<id>"`` names it in jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from api.deps import UNAUTHORIZED_RESPONSE, Conn, Owner, SettingsDep, StateDep
from api.errors import FieldError
from api.json_body import Utf8JsonRoute
from api.state import AppState
from persistence import dataset_store
from persistence.db import as_utc
from persistence.models import DATASET_STATUSES
from storage import StoreUnavailable, store_for
from storage.archives import CONTENT_TYPES, ArchiveError, Limits, inspect, sniff

log = logging.getLogger("ssql.api")
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=UNAUTHORIZED_RESPONSE, route_class=Utf8JsonRoute)

NOT_FOUND = "dataset not found"
RETRY_AFTER_S = 10
#: background validations of this process (a reference keeps each task alive until it ends)
_validations: set[asyncio.Task[None]] = set()


def dataset_view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"], "name": row["name"], "status": row["status"], "dataset": dataset_store.UPLOAD_PREFIX + row["id"],
        "sha256": row["sha256"], "bytes": row["bytes"], "format": row["format"], "classes": row["classes"],
        "train_images": row["train_images"], "val_images": row["val_images"], "error": row["error"],
        "created_at": _ts(row["created_at"]), "updated_at": _ts(row["updated_at"]),
    }  # fmt: skip


def _ts(value: Any) -> str | None:
    value = as_utc(value)
    return None if value is None else value.isoformat()


def _limits(settings: Any) -> Limits:
    return Limits(settings.dataset_max_entries, settings.dataset_max_unpacked_bytes, settings.dataset_max_ratio)


#: the request body as OpenAPI states it (the route reads the raw stream itself)
_ARCHIVE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                                  "description": "the archive's bytes, sent as `application/zip`, `application/x-tar`, `application/gzip` "
                                  "(a .tar.gz) or `application/octet-stream` (the format is then read from its first bytes)"}}
#: a dataset name: printable, no surrounding spaces
NAME_PATTERN = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$"


@router.post("", status_code=202, openapi_extra=_ARCHIVE_BODY, responses={
    200: {"description": "The same archive was uploaded before by you: that dataset (content-addressed by sha256)"},
    202: {"description": "Stored for validation: `status` is `validating`; poll `GET /v1/datasets/{id}`"},
    413: {"description": "The body is above `SSQL_MAX_UPLOAD_BYTES`, or your datasets would pass "
          "`SSQL_MAX_DATASET_BYTES_PER_OWNER` (body names the quota, limit and usage)"},
    422: {"description": "A wrong Content-Type (`application/zip`, `application/x-tar`, `application/gzip`), a bad name"},
    503: {"description": "The object store is unreachable (`Retry-After`): nothing was kept"},
})
async def upload_dataset(
    request: Request,
    owner: Owner,
    conn: Conn,
    state: StateDep,
    name: Annotated[str, Query(min_length=1, max_length=200, pattern=NAME_PATTERN, description="your name for the dataset")],
) -> JSONResponse:
    """Upload an image-folder archive (`train/<class>/*`, `val/<class>/*`, optionally in one top-level
    folder; png, jpg, jpeg, webp, bmp) as the request body. It is validated in the background:
    `status` goes from `validating` to `ready` (usable as `"dataset": "upload:<id>"`) or `invalid`
    (`error` names up to 20 offending files)."""
    settings = state.settings
    content_type = request.headers.get("content-type")
    fmt = CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
    if fmt is None:
        raise FieldError(("header", "content-type"), "must be application/zip, application/x-tar, application/gzip (a .tar.gz) or "
                         f"application/octet-stream (the format read from the first bytes), got {content_type!r}")
    try:  # a store that cannot take the archive now: say so before the body is sent (nothing is kept)
        await anyio.to_thread.run_sync(store_for(settings).check)
    except StoreUnavailable as e:
        return JSONResponse({"detail": f"{e}; try again later", "code": "store_unavailable"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
    spool = settings.resolved_home() / "uploads"
    spool.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=spool, prefix="upload-", suffix=".part")
    tmp = Path(tmp_name)
    keep = False
    try:
        digest, size = await _spool(request, fd, settings.max_upload_bytes)
        quota = settings.max_dataset_bytes_per_owner
        if quota is not None:
            usage = await dataset_store.usage_bytes(conn, owner)
            existing = await _existing(conn, owner, digest)
            if existing is None and usage + size > quota:
                return JSONResponse({"detail": f"this upload ({size} bytes) would take your datasets to {usage + size} bytes, "
                                     f"above the quota max_dataset_bytes_per_owner of {quota} bytes: delete a dataset first",
                                     "code": "quota_exceeded", "quota": "max_dataset_bytes_per_owner", "limit": quota,
                                     "usage": usage}, status_code=413)  # fmt: skip
        await dataset_store.expire_stale(conn, owner, settings.dataset_validation_timeout_seconds)
        row, created = await dataset_store.create_or_existing(conn, owner, name, digest, size, fmt)
        if not created:
            return JSONResponse(dataset_view(row), status_code=200)
        task = asyncio.get_running_loop().create_task(_validate(state, row["id"], owner, digest, fmt, tmp))
        _validations.add(task)
        task.add_done_callback(_validations.discard)
        keep = True
        return JSONResponse(dataset_view(row), status_code=202, headers={"Location": f"/v1/datasets/{row['id']}"})
    finally:
        if not keep:
            tmp.unlink(missing_ok=True)


async def _existing(conn: Any, owner: int, digest: str) -> Any:
    from sqlalchemy import select

    from persistence.models import Dataset

    return (await conn.execute(select(Dataset.id).where(Dataset.owner_id == owner, Dataset.sha256 == digest,
                                                        Dataset.status != "invalid"))).first()


async def _spool(request: Request, fd: int, limit: int) -> tuple[str, int]:
    """Write the body to ``fd`` part by part (sha256 as it comes); 413 past ``limit``."""
    h, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as f:
        async for chunk in request.stream():
            if not chunk:
                continue
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body larger than {limit} bytes (the server's SSQL_MAX_UPLOAD_BYTES)")
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest(), size


async def _validate(state: AppState, dataset_id: str, owner: int, digest: str, fmt: str, tmp: Path) -> None:
    """Check the archive, store it when good, record the outcome. Never raises."""
    settings = state.settings
    store, key, stored = store_for(settings), "", False
    values: dict[str, Any]
    try:
        if fmt == "auto" and (fmt := sniff(tmp) or "") == "":
            raise ArchiveError("not a zip, tar or tar.gz archive (by its first bytes)")
        key = dataset_store.storage_key(owner, digest, fmt)
        report = await anyio.to_thread.run_sync(inspect, tmp, fmt, _limits(settings))
        if report.error():
            values = {"status": "invalid", "error": report.error()}
        else:
            written = await anyio.to_thread.run_sync(store.put_file, key, tmp, digest)
            stored = True
            if written != digest:
                values = {"status": "invalid", "error": f"the archive changed while it was stored (sha256 {written}, received {digest}): upload it again"}
            else:
                values = {"status": "ready", "format": fmt, "storage_key": key, "classes": report.classes, "train_images": report.train_images,
                          "val_images": report.val_images, "error": None}
    except ArchiveError as e:
        values = {"status": "invalid", "error": str(e)}
    except StoreUnavailable as e:
        values = {"status": "invalid", "error": f"the object store was unreachable ({e}): upload the archive again"}
    except Exception as e:  # noqa: BLE001 - a validation must end in a status, never stay 'validating'
        log.exception("dataset %s: validation failed", dataset_id)
        values = {"status": "invalid", "error": f"internal error while validating ({type(e).__name__}): upload it again"}
    finally:
        tmp.unlink(missing_ok=True)
    try:
        async with state.engine.connect() as conn:
            done = await dataset_store.finish_validation(conn, dataset_id, **values)
    except Exception:  # noqa: BLE001
        log.exception("dataset %s: recording the validation failed", dataset_id)
        done = False
    if stored and (not done or values["status"] != "ready"):
        await anyio.to_thread.run_sync(store.delete, key)


@router.get("", responses={422: {"description": "A bad `status`, `limit` or `offset`"}})
async def list_datasets(
    owner: Owner, conn: Conn, settings: SettingsDep,
    status: Annotated[str | None, Query(json_schema_extra={"enum": list(DATASET_STATUSES)})] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> JSONResponse:
    """Your datasets, newest first; pass ``next_offset`` back as ``offset`` for the next page."""
    if status is not None and status not in DATASET_STATUSES:
        raise FieldError(("query", "status"), f"must be one of {list(DATASET_STATUSES)}, got {status!r}")
    limit = min(limit, settings.page_size_max)
    await dataset_store.expire_stale(conn, owner, settings.dataset_validation_timeout_seconds)
    rows = await dataset_store.list_for(conn, owner, status, limit + 1, offset)
    return JSONResponse({"items": [dataset_view(r) for r in rows[:limit]], "next_offset": offset + limit if len(rows) > limit else None})


@router.get("/{dataset_id}", responses={404: {"description": "No such dataset of yours"}})
async def get_dataset(dataset_id: str, owner: Owner, conn: Conn, settings: SettingsDep) -> JSONResponse:
    await dataset_store.expire_stale(conn, owner, settings.dataset_validation_timeout_seconds)
    row = await dataset_store.get(conn, owner, dataset_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    return JSONResponse(dataset_view(row))


@router.delete("/{dataset_id}", status_code=204, responses={
    404: {"description": "No such dataset of yours"},
    409: {"description": "A queued or running job uses it (`jobs` names them)"},
    503: {"description": "The object store is unreachable (`Retry-After`): nothing was deleted"},
})
async def delete_dataset(dataset_id: str, owner: Owner, conn: Conn, settings: SettingsDep) -> Response:
    """Delete the dataset and its object in the store (one still validating too: its validation then
    stores nothing, or removes what it stored)."""
    row = await dataset_store.get(conn, owner, dataset_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    using = await dataset_store.jobs_using(conn, owner, dataset_id)
    if using:
        return JSONResponse({"detail": f"queued or running jobs use this dataset: {', '.join(using)}; cancel them or wait",
                             "code": "dataset_in_use", "jobs": using}, status_code=409)
    if row["storage_key"]:
        try:
            await anyio.to_thread.run_sync(store_for(settings).delete, row["storage_key"])
        except StoreUnavailable as e:
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    await dataset_store.remove(conn, owner, dataset_id)
    return Response(status_code=204)
