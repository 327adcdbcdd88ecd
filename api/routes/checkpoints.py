"""Checkpoint routes: list a job's files and download one (ETag = sha256, HTTP Range via FileResponse).

A file is served only after its bytes were checked against the sha256 registered when its job
succeeded; a file that changed on disk is refused with 409 ``artifact_corrupt``. The check is
cached per file by ``(inode, size, mtime_ns, ctime_ns)``: any write to the file changes ctime, so
only the first download after a change hashes the file again (docs/decisions/011).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from pathlib import Path as FilePath
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from api.deps import UNAUTHORIZED_RESPONSE, Conn, JobId, Owner, SettingsDep
from api.errors import FieldError
from api.head import is_head
from api.schemas import CheckpointOut
from api.views import checkpoint_view
from persistence import api_store
from persistence.models import ARTIFACT_FORMATS
from persistence.settings import Settings
from ssql_core.bits import ACCEPTED_FORMS, parse_bits
from storage.keys import artifact_key

log = logging.getLogger("ssql.api")
router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"], responses=UNAUTHORIZED_RESPONSE)

#: (path, inode, size, mtime_ns, ctime_ns) -> the sha256 the file had then (bounded; cleared when full)
_VERIFIED: dict[tuple[str, int, int, int, int], str] = {}
_VERIFIED_MAX = 10_000
CORRUPT_CODE = "artifact_corrupt"
#: a download's file name ending per format (``JOB-4w4a.safetensors``; ``ssql download`` names files the same way)
FILE_SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "torchvision": ".torchvision.safetensors", "torch": ".pt"}
#: the download route's ``bits``, as its schema states it: any case, ``f`` for ``a`` (no spaces, no leading zeros)
PATH_BITS_PATTERN = "^([Ff][Pp]|[2-8][Ww][2-8][AaFf]|mixed-[0-9a-f]{8})$"  # mixed-...: a per-layer configuration's label
_PATH_BITS = re.compile(PATH_BITS_PATTERN)


def _sha256(path: FilePath) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


async def file_digest(path: FilePath) -> str:
    """The file's sha256, hashed again only when its stat (inode, size, mtime, ctime) changed."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = await anyio.to_thread.run_sync(_sha256, path)
        if len(_VERIFIED) >= _VERIFIED_MAX:
            _VERIFIED.clear()
        _VERIFIED[key] = digest
    return digest


async def _from_store(settings: Settings, art: Any) -> FilePath | Response | None:
    """A registered file that this host lacks, from the object store (``artifacts/<sha256>``,
    verified): its path in the API's bounded copy (:class:`storage.fetched.FetchedCopies`,
    ``SSQL_API_FETCHED_MAX_BYTES``), the answer to give (409, 503), or None when the store lacks it."""
    from storage import DigestMismatch, StoreUnavailable, store_for
    from storage.fetched import FetchedCopies

    copies = FetchedCopies(settings.resolved_cache_dir() / "fetched", settings.api_fetched_max_bytes)
    try:
        return await anyio.to_thread.run_sync(copies.path, store_for(settings), artifact_key(art["sha256"]), art["sha256"])
    except FileNotFoundError:
        return None
    except DigestMismatch as e:
        log.error("stored %s/%s refused: %s", art["bits"], art["format"], e)
        return JSONResponse({"detail": f"the stored copy of this {art['bits']}/{art['format']} file does not match its sha256: "
                             "it is corrupt and is not served; run the job again", "code": CORRUPT_CODE,
                             "sha256": art["sha256"]}, status_code=409)
    except StoreUnavailable as e:
        return JSONResponse({"detail": f"{e}; try again later"}, status_code=503, headers={"Retry-After": "10"})


def _digest_headers(sha256: str) -> dict[str, str]:
    digest = base64.b64encode(bytes.fromhex(sha256)).decode()
    return {"ETag": f'"{sha256}"', "Repr-Digest": f"sha-256=:{digest}:", "X-Checksum-Sha256": sha256}


async def _redirect(settings: Settings, art: Any, filename: str, head: bool, headers: dict[str, str]) -> Response | None:
    """``SSQL_DOWNLOAD_REDIRECT``: a 307 to a presigned URL of the stored object (GET, or HEAD for a
    HEAD: the signature covers the method), valid ``SSQL_DOWNLOAD_REDIRECT_SECONDS``. None when
    the store has no such URLs, lacks the object or cannot be reached: the file is then served here."""
    from storage import StoreUnavailable, store_for

    store, key = store_for(settings), artifact_key(art["sha256"])
    try:
        if not await anyio.to_thread.run_sync(store.exists, key):
            return None
        url = store.presigned_url(key, settings.download_redirect_seconds, "HEAD" if head else "GET", filename)
    except StoreUnavailable as e:
        log.warning("download redirect not possible (%s): serving the file", e)
        return None
    if url is None:
        return None
    return Response(status_code=307, headers={**headers, "Location": url, "Cache-Control": "private, no-store"})


@router.get(
    "/{job_id}/checkpoints",
    response_model=list[CheckpointOut],
    responses={401: {"description": "missing or invalid API key"}, 404: {"description": "job not found"}},
)
async def list_checkpoints(job_id: JobId, owner: Owner, conn: Conn) -> JSONResponse:
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
        307: {"description": "With `SSQL_DOWNLOAD_REDIRECT=1` and an S3 store: `Location` is a presigned URL of the stored "
              "file (short-lived; Range works there too); ETag and `X-Checksum-Sha256` here are its sha256, to verify the bytes"},
        304: {"description": "If-None-Match matched the sha256"},
        401: {"description": "missing or invalid API key"},
        404: {"description": "job or checkpoint not found"},
        409: {
            "description": "The file on the server no longer matches its registered sha256 (corrupted or changed "
            "on disk): it is not served. Body: `{\"detail\": ..., \"code\": \"artifact_corrupt\", \"sha256\": ...}`",
            "content": {"application/json": {"example": {"detail": "...", "code": CORRUPT_CODE, "sha256": "..."}}},
        },
        422: {"description": "Invalid `format` or `bits` (`4w4f` is taken as `4w4a`): `detail[].loc` names it"},
    },
)
async def download_checkpoint(
    job_id: JobId,
    bits: Annotated[str, Path(description="a bit-width: `fp` or `{w}w{a}a` (w, a from 2 to 8; any case; `4w4f` is `4w4a`), "
                                          "or a per-layer configuration's label `mixed-{8 hex digits}`",
                              json_schema_extra={"pattern": PATH_BITS_PATTERN})],
    owner: Owner,
    conn: Conn,
    settings: SettingsDep,
    request: Request,
    format: Annotated[
        str | None, Query(description=f"one of {', '.join(ARTIFACT_FORMATS)}; default: the first one available",
                          json_schema_extra={"enum": list(ARTIFACT_FORMATS)})
    ] = None,
    redirect: Annotated[bool, Query(description="with `SSQL_DOWNLOAD_REDIRECT=1`: false serves the file here instead of "
                                    "answering 307 to the store (a page that may fetch only its own origin)")] = True,
) -> Response:
    """Download a checkpoint. Verify it against the ETag (sha256 of the whole file)."""
    if format is not None and format not in ARTIFACT_FORMATS:
        raise FieldError(("query", "format"), f"must be one of {list(ARTIFACT_FORMATS)}, got {format!r}")
    if not await api_store.job_exists(conn, owner, job_id):
        raise HTTPException(404, "job not found")
    try:  # every spelling the submit routes take: "4w4f" is 4w4a, "4W4A" too (and no other: the schema's pattern)
        if not _PATH_BITS.fullmatch(bits):
            raise ValueError(f"invalid bit-width {bits!r}; accepted: {ACCEPTED_FORMS}")
        bits = bits if bits.startswith("mixed-") else str(parse_bits(bits))
    except ValueError as e:
        raise FieldError(("path", "bits"), str(e)) from None
    rows = [r for r in await api_store.artifacts(conn, job_id) if r["bits"] == bits and format in (None, r["format"])]
    if not rows:
        raise HTTPException(404, f"no checkpoint at bits={bits!r}" + (f" in format {format!r}" if format else ""))
    art = rows[0]
    root = settings.resolved_artifacts_dir()
    path = (root / art["path"]).resolve()
    if root not in path.parents:
        raise HTTPException(404, "checkpoint file is missing on the server")
    filename = f"{job_id}-{art['bits']}{FILE_SUFFIXES.get(art['format'], path.suffix)}"
    if redirect and settings.download_redirect and settings.storage_url is not None:
        headers = _digest_headers(art["sha256"])
        if request.headers.get("if-none-match") in (headers["ETag"], art["sha256"]):
            return Response(status_code=304, headers=headers)
        redirect = await _redirect(settings, art, filename, is_head(request), headers)
        if redirect is not None:
            return redirect
    if not path.is_file() and settings.storage_url is not None:  # written on another host: from the store
        fetched = await _from_store(settings, art)
        if isinstance(fetched, Response):
            return fetched
        path = fetched or path
    if not path.is_file():
        raise HTTPException(404, "checkpoint file is missing on the server")
    if await file_digest(path) != art["sha256"]:
        log.error("job %s: %s (%s/%s) does not match its sha256 %s; refused", job_id, path, bits, art["format"], art["sha256"])
        return JSONResponse(
            {
                "detail": f"the {art['bits']}/{art['format']} file of this job changed on the server since it was "
                "written (its sha256 no longer matches): it is corrupt and is not served; run the job again",
                "code": CORRUPT_CODE,
                "sha256": art["sha256"],
            },
            status_code=409,
        )
    headers = _digest_headers(art["sha256"])
    if request.headers.get("if-none-match") in (headers["ETag"], art["sha256"]):
        return Response(status_code=304, headers=headers)
    response = FileResponse(path, headers=headers, filename=filename, media_type="application/octet-stream")
    if is_head(request):  # the download's headers (size, ETag, digest, name) without reading the file
        response.headers["content-length"] = str(path.stat().st_size)
        return Response(status_code=200, headers=dict(response.headers))
    return response
