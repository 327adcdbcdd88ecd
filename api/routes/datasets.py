"""Dataset routes: upload an image-folder archive (streamed) or register one already in an S3
bucket, list, show, delete (decision 018).

An upload's body is streamed to a temporary file part by part while its sha256 is computed (never
held in memory); a registration (a JSON body ``{"name", "uri": "s3://bucket/prefix/"}``) is read
from its bucket into such a file (a folder packed into a tar). Either archive is then checked off
the request path (a background step of this process) and, when it is good, stored in the object
store. ``"dataset": "upload:<id>"`` names it in jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import IntegrityError

from api.deps import UNAUTHORIZED_RESPONSE, Conn, Owner, SettingsDep, StateDep
from api.errors import FieldError, FieldErrors
from api.json_body import Utf8JsonRoute
from api.state import AppState
from persistence import dataset_store
from persistence.db import as_utc
from persistence.models import DATASET_STATUSES
from storage import StoreUnavailable, store_for
from storage.archives import CONTENT_TYPES, ArchiveError, Limits, inspect, sniff
from storage.sources import Source, SourceError

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
        "uri": row["source_uri"], "created_at": _ts(row["created_at"]), "updated_at": _ts(row["updated_at"]),
    }  # fmt: skip


def _ts(value: Any) -> str | None:
    value = as_utc(value)
    return None if value is None else value.isoformat()


def _limits(settings: Any) -> Limits:
    return Limits(settings.dataset_max_entries, settings.dataset_max_unpacked_bytes, settings.dataset_max_ratio)


#: a dataset name: printable, no surrounding spaces
NAME_PATTERN = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$"
#: the largest JSON body of a registration
MAX_REGISTRATION_BYTES = 16 << 10


class DatasetRegistration(BaseModel):
    """Register data already in an S3 bucket the server may read (``SSQL_DATASET_URI_BUCKETS``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN, description="your name for the dataset")
    uri: str = Field(min_length=1, max_length=1024, description="`s3://bucket/prefix/` (an image folder: `train/<class>/*`, "
                     "`val/<class>/*`) or `s3://bucket/key.zip` (`.tar`, `.tar.gz`, `.tgz`: an archive of one)")


#: the request body as OpenAPI states it (the route reads the raw stream itself)
_ARCHIVE_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": DatasetRegistration.model_json_schema()}},
    "description": "the archive's bytes, sent as `application/zip`, `application/x-tar`, `application/gzip` (a .tar.gz) or "
                   "`application/octet-stream` (the format is then read from its first bytes), with `?name=`; or, as "
                   "`application/json`, `{\"name\": ..., \"uri\": \"s3://bucket/prefix/\"}` to register data already in a bucket"}}


@router.post("", status_code=202, openapi_extra=_ARCHIVE_BODY, responses={
    200: {"description": "The same archive was uploaded before by you: that dataset (content-addressed by sha256)"},
    202: {"description": "Stored (or found in its bucket) for validation: `status` is `validating`; poll `GET /v1/datasets/{id}`"},
    413: {"description": "The body (or the registered archive) is above `SSQL_MAX_UPLOAD_BYTES`, or your datasets would pass "
          "`SSQL_MAX_DATASET_BYTES_PER_OWNER` (body names the quota, limit and usage)"},
    422: {"description": "A wrong Content-Type (`application/zip`, `application/x-tar`, `application/gzip`, `application/json`), "
          "a bad name; a registration's `uri` that is malformed, not allowed or not readable (`loc` names the field)"},
    503: {"description": "The object store is unreachable (`Retry-After`): nothing was kept"},
})
async def upload_dataset(
    request: Request,
    owner: Owner,
    conn: Conn,
    state: StateDep,
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NAME_PATTERN,
                                      description="your name for the dataset (an archive upload; default: the file name of "
                                                  "`Content-Disposition`, else `upload-` and the sha256's first 12 digits)")] = None,
) -> JSONResponse:
    """Upload an image-folder archive (`train/<class>/*`, `val/<class>/*`, optionally in one top-level
    folder; png, jpg, jpeg, webp, bmp) as the request body, or register one already in an S3
    bucket with a JSON body `{"name": ..., "uri": "s3://bucket/prefix/"}` (a folder, or an archive's
    key). It is validated in the background: `status` goes from `validating` to `ready` (usable as
    `"dataset": "upload:<id>"`) or `invalid` (`error` names up to 20 offending files)."""
    settings = state.settings
    content_type = request.headers.get("content-type")
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json":
        return await _register(request, owner, conn, state)
    fmt = CONTENT_TYPES.get(media)
    if fmt is None:
        raise FieldError(("header", "content-type"), "must be application/zip, application/x-tar, application/gzip (a .tar.gz) or "
                         "application/octet-stream (the format read from the first bytes) for an archive, or application/json "
                         f"for a registration ({{\"name\", \"uri\": \"s3://...\"}}), got {content_type!r}")
    try:  # a store that cannot take the archive now: say so before the body is sent (nothing is kept)
        await anyio.to_thread.run_sync(store_for(settings).check)
    except StoreUnavailable as e:
        return _unavailable(e)
    spool = settings.resolved_home() / "uploads"
    spool.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=spool, prefix="upload-", suffix=".part")
    tmp = Path(tmp_name)
    keep = False
    try:
        digest, size = await _spool(request, fd, settings.max_upload_bytes)
        if (over := await _over_quota(conn, owner, settings, size, digest)) is not None:
            return over
        await dataset_store.expire_stale(conn, owner, settings.dataset_validation_timeout_seconds)
        name = name or _default_name(request, digest)
        row, created = await dataset_store.create_or_existing(conn, owner, name, digest, size, fmt)
        if not created:
            return JSONResponse(dataset_view(row), status_code=200)
        _start(_validate(state, row["id"], owner, digest, fmt, tmp))
        keep = True
        return JSONResponse(dataset_view(row), status_code=202, headers={"Location": f"/v1/datasets/{row['id']}"})
    finally:
        if not keep:
            tmp.unlink(missing_ok=True)


def _default_name(request: Request, digest: str) -> str:
    """An upload without ``?name=``: the file name of its ``Content-Disposition``, else ``upload-<sha256[:12]>``."""
    import re

    m = re.search(r'filename="?([^";]+)"?', request.headers.get("content-disposition", ""))
    name = m.group(1).strip()[:200] if m else ""
    return name if name and re.match(NAME_PATTERN, name) else f"upload-{digest[:12]}"


def _unavailable(e: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"{e}; try again later", "code": "store_unavailable"}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


def _start(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _validations.add(task)
    task.add_done_callback(_validations.discard)


async def _over_quota(conn: Any, owner: int, settings: Any, size: int, digest: str | None = None) -> JSONResponse | None:
    """The 413 of an archive that would take the owner past ``SSQL_MAX_DATASET_BYTES_PER_OWNER``
    (an archive they already have takes no more room)."""
    quota = settings.max_dataset_bytes_per_owner
    if quota is None:
        return None
    usage = await dataset_store.usage_bytes(conn, owner)
    if usage + size <= quota or (digest is not None and await _existing(conn, owner, digest) is not None):
        return None
    return JSONResponse({"detail": f"this dataset ({size} bytes) would take your datasets to {usage + size} bytes, "
                         f"above the quota max_dataset_bytes_per_owner of {quota} bytes: delete a dataset first",
                         "code": "quota_exceeded", "quota": "max_dataset_bytes_per_owner", "limit": quota,
                         "usage": usage}, status_code=413)  # fmt: skip


async def _registration_body(request: Request) -> DatasetRegistration:
    """The JSON body of a registration (strict UTF-8, at most MAX_REGISTRATION_BYTES); 422 naming the field."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REGISTRATION_BYTES:
            raise HTTPException(413, f"a registration's JSON body is at most {MAX_REGISTRATION_BYTES} bytes")
    try:
        text = bytes(body).decode("utf-8")
        data = json.loads(text)
        if text.startswith("\ufeff"):
            raise ValueError("the body starts with a byte order mark")
    except ValueError as e:
        raise FieldError(("body",), f"not valid UTF-8 JSON: {e}") from None
    try:
        return DatasetRegistration.model_validate(data)
    except ValidationError as e:
        errors = [FieldError(("body", *map(str, err["loc"])), err["msg"]) for err in e.errors()]
        raise (FieldErrors(errors) if len(errors) > 1 else errors[0]) from None


async def _register(request: Request, owner: int, conn: Any, state: AppState) -> JSONResponse:
    """``{"name", "uri"}``: check the URI now (format, allowed bucket, something readable there),
    read and validate its data in the background."""
    from storage import sources

    settings = state.settings
    body = await _registration_body(request)
    store_url = settings.resolved_storage_url()
    if not store_url.startswith("s3://"):
        raise FieldError(("body", "uri"), f"this server's object store is not S3 ({store_url}): upload the archive instead "
                         "(POST /v1/datasets?name=... with the archive as the body)")
    try:
        source = sources.parse(body.uri)
        sources.check_allowed(source, settings.uri_buckets(), store_url)
        size = await anyio.to_thread.run_sync(sources.probe, store_for(settings).client, source)  # type: ignore[attr-defined]
    except SourceError as e:
        raise FieldError(("body", "uri"), str(e)) from None
    except StoreUnavailable as e:
        return _unavailable(e)
    if size is not None and size > settings.max_upload_bytes:
        raise HTTPException(413, f"{source.uri} has {size} bytes, more than {settings.max_upload_bytes} (the server's SSQL_MAX_UPLOAD_BYTES)")
    if size is not None and (over := await _over_quota(conn, owner, settings, size)) is not None:
        return over
    await dataset_store.expire_stale(conn, owner, settings.dataset_validation_timeout_seconds)
    fmt = "tar" if source.fmt == "folder" else source.fmt
    row = await dataset_store.create_registration(conn, owner, body.name, source.uri, fmt, size or 0)
    _start(_validate(state, row["id"], owner, None, fmt, None, source))
    return JSONResponse(dataset_view(row), status_code=202, headers={"Location": f"/v1/datasets/{row['id']}"})


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


async def _validate(state: AppState, dataset_id: str, owner: int, digest: str | None, fmt: str, tmp: Path | None,
                    source: Source | None = None) -> None:
    """Check the archive (a registration's read from its bucket first), store it when good,
    record the outcome. Never raises."""
    settings = state.settings
    store, key, stored = store_for(settings), "", False
    values: dict[str, Any] = {}
    again = "upload the archive again" if source is None else "register it again"
    try:
        if source is not None:
            tmp = await _fetch_source(state, dataset_id, owner, source, values)
            digest, fmt = values["sha256"], values["format"]
        assert tmp is not None and digest is not None
        if fmt == "auto" and (fmt := sniff(tmp) or "") == "":
            raise ArchiveError("not a zip, tar or tar.gz archive (by its first bytes)")
        key = dataset_store.storage_key(owner, digest, fmt)
        report = await anyio.to_thread.run_sync(inspect, tmp, fmt, _limits(settings))
        if report.error():
            values.update(status="invalid", error=report.error())
        else:
            written = await anyio.to_thread.run_sync(store.put_file, key, tmp, digest)
            stored = True
            if written != digest:
                values.update(status="invalid", error=f"the archive changed while it was stored (sha256 {written}, received {digest}): {again}")
            else:
                values.update(status="ready", format=fmt, storage_key=key, classes=report.classes, train_images=report.train_images,
                              val_images=report.val_images, error=None)
    except (ArchiveError, SourceError) as e:
        values.update(status="invalid", error=str(e))
    except StoreUnavailable as e:
        values.update(status="invalid", error=f"the object store was unreachable ({e}): {again}")
    except Exception as e:  # noqa: BLE001 - a validation must end in a status, never stay 'validating'
        log.exception("dataset %s: validation failed", dataset_id)
        values.update(status="invalid", error=f"internal error while validating ({type(e).__name__}): {again}")
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    if values["status"] == "invalid" and source is not None:
        values.pop("sha256", None)  # an invalid registration holds no content: it blocks no later one
    try:
        async with state.engine.connect() as conn:
            try:
                done = await dataset_store.finish_validation(conn, dataset_id, **values)
            except IntegrityError:  # the same content became another dataset of the owner meanwhile: the object is its
                await conn.rollback()
                stored = False
                other = await dataset_store.same_content(conn, owner, values["sha256"], dataset_id)
                done = await dataset_store.finish_validation(conn, dataset_id, status="invalid", error=_duplicate(other))
    except Exception:  # noqa: BLE001
        log.exception("dataset %s: recording the validation failed", dataset_id)
        done = False
    if stored and (not done or values["status"] != "ready"):
        try:
            await anyio.to_thread.run_sync(store.delete, key)
        except StoreUnavailable as e:
            log.warning("dataset %s: its object %s could not be removed (%s)", dataset_id, key, e)


def _duplicate(other: Any) -> str:
    if other is None:
        return "the same content became another of your datasets while this one was validating: list your datasets"
    return f"the same content as your dataset {other['id']} ({other['name']!r}, {other['status']}): use upload:{other['id']}"


async def _fetch_source(state: AppState, dataset_id: str, owner: int, source: Source, values: dict[str, Any]) -> Path:
    """Read a registration's data into one archive in the spool folder; sets sha256, bytes and
    format in ``values``. A dataset the owner has already, or one past the quota, is a
    :class:`SourceError` (nothing stored)."""
    from storage import sources

    settings = state.settings
    spool = settings.resolved_home() / "uploads"
    spool.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool, prefix="register-", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        fmt, digest, size = await anyio.to_thread.run_sync(sources.fetch, store_for(settings).client, source, tmp,  # type: ignore[attr-defined]
                                                           _limits(settings), settings.max_upload_bytes)
        values.update(sha256=digest, bytes=size, format=fmt)
        async with state.engine.connect() as conn:
            other = await dataset_store.same_content(conn, owner, digest, dataset_id)
            if other is not None:
                raise SourceError(_duplicate(other))
            over = await _over_quota(conn, owner, settings, size)
            if over is not None:
                raise SourceError(json.loads(over.body)["detail"])
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


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
