"""Checkpoint routes: list a job's files and download one (ETag = sha256, HTTP Range via FileResponse)."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from api.deps import Conn, Owner, SettingsDep
from api.errors import FieldError
from api.schemas import CheckpointOut
from api.views import checkpoint_view
from persistence import api_store
from persistence.models import ARTIFACT_FORMATS

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut], responses={404: {"description": "job not found"}})
async def list_checkpoints(job_id: str, owner: Owner, conn: Conn) -> JSONResponse:
    """Files the job produced: bit-width, format, size, sha256 and download URL."""
    if not await api_store.job_exists(conn, owner, job_id):
        raise HTTPException(404, "job not found")
    return JSONResponse([checkpoint_view(r, job_id) for r in await api_store.artifacts(conn, job_id)])


@router.get(
    "/{job_id}/checkpoints/{bits}",
    response_class=FileResponse,
    responses={
        200: {"description": "The file; ETag is its sha256", "content": {"application/octet-stream": {}}},
        206: {"description": "Partial content (Range request)"},
        304: {"description": "If-None-Match matched the sha256"},
        404: {"description": "job or checkpoint not found"},
    },
)
async def download_checkpoint(
    job_id: str,
    bits: str,
    owner: Owner,
    conn: Conn,
    settings: SettingsDep,
    request: Request,
    format: Annotated[
        str | None, Query(description=f"one of {', '.join(ARTIFACT_FORMATS)}; default: the first one available")
    ] = None,
) -> Response:
    """Download a checkpoint. Verify it against the ETag (sha256 of the whole file)."""
    if format is not None and format not in ARTIFACT_FORMATS:
        raise FieldError(("query", "format"), f"must be one of {list(ARTIFACT_FORMATS)}, got {format!r}")
    if not await api_store.job_exists(conn, owner, job_id):
        raise HTTPException(404, "job not found")
    rows = [r for r in await api_store.artifacts(conn, job_id) if r["bits"] == bits and format in (None, r["format"])]
    if not rows:
        raise HTTPException(404, f"no checkpoint at bits={bits!r}" + (f" in format {format!r}" if format else ""))
    art = rows[0]
    root = settings.resolved_artifacts_dir()
    path = (root / art["path"]).resolve()
    if root not in path.parents or not path.is_file():
        raise HTTPException(404, "checkpoint file is missing on the server")
    etag = f'"{art["sha256"]}"'
    digest = base64.b64encode(bytes.fromhex(art["sha256"])).decode()
    headers = {"ETag": etag, "Repr-Digest": f"sha-256=:{digest}:", "X-Checksum-Sha256": art["sha256"]}
    if request.headers.get("if-none-match") in (etag, art["sha256"]):
        return Response(status_code=304, headers=headers)
    filename = f"{job_id}-{art['bits']}-{art['format']}{path.suffix}"
    return FileResponse(path, headers=headers, filename=filename, media_type="application/octet-stream")
