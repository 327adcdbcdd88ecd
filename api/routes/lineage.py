"""Lineage and reuse: a job's chain (``/lineage``) and the request that makes it again (``/reproduce``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse

from api.deps import UNAUTHORIZED_RESPONSE, Conn, JobId, Owner
from api.json_body import Utf8JsonRoute
from api.reproduce import reproduce
from api.schemas import LineageOut, ReproduceOut
from api.specs import bits_name
from persistence import api_store, lineage
from persistence.db import as_utc

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED_RESPONSE, route_class=Utf8JsonRoute)
NOT_FOUND = "job not found"


def describe(job: Mapping[str, Any]) -> str:
    """What a job ran, in a few words (no user-written text)."""
    spec = job.get("spec") or {}
    c = spec.get("config") or {}
    kind = job["kind"]
    bits = c.get("bits")
    bits_text = ",".join(map(bits_name, bits)) if isinstance(bits, list) else (bits or "")  # a per-layer map by its label
    if kind == "pretrain":
        return " · ".join(str(x) for x in (c.get("method"), c.get("backbone"), c.get("dataset")) if x)
    if kind == "eval":
        how = ["kNN"] if c.get("protocol") == "knn" else [c.get("calibration") or "", f"{c.get('probe') or 'linear'} probe"]
        return " · ".join(x for x in (f"eval {bits_text}", *how) if x)
    if kind in ("distill", "finetune"):
        return " ".join(x for x in (kind, bits_text, c.get("quantizer") or "") if x)
    formats = ",".join(c.get("formats") or [])
    return f"export {bits_text} as {formats}".strip()


def _ts(value: Any) -> str | None:
    v = as_utc(value)
    return None if v is None else v.isoformat()


def _node(row: Mapping[str, Any]) -> dict[str, Any]:
    ts = _ts
    return {"id": row["id"], "kind": row["kind"], "status": row["status"], "name": row["name"], "tags": row["tags"] or [],
            "source_job": row["source_job_id"], "what": describe(row), "created_at": ts(row["created_at"]),
            "finished_at": ts(row["finished_at"]), "depth": row.get("depth")}


@router.get("/{job_id}/lineage", response_model=LineageOut, responses={404: {"description": NOT_FOUND}})
async def job_lineage(
    job_id: JobId,
    owner: Owner,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=1000, description="the most jobs listed in `children` and in `tree`")] = 200,
) -> JSONResponse:
    """The jobs this one was made from (``parents``: its source first), the jobs made from it
    (``children``) and the whole chain from its first job (``tree``: pretrain -> eval / finetune /
    export -> distill / export), depth-first. Only your own jobs appear."""
    row = await lineage.node(conn, owner, job_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    parents = await lineage.ancestors(conn, owner, row)
    kids = await lineage.children(conn, owner, job_id, limit + 1)
    root = parents[-1]["id"] if parents else job_id
    tree, truncated = await lineage.tree(conn, owner, root, limit)
    return JSONResponse({"job_id": job_id, "parents": [_node(p) for p in parents], "children": [_node(k) for k in kids[:limit]],
                         "tree": [_node(t) for t in tree], "truncated": truncated or len(kids) > limit})


@router.get("/{job_id}/reproduce", response_model=ReproduceOut, responses={404: {"description": NOT_FOUND}})
async def job_reproduce(job_id: JobId, owner: Owner, conn: Conn) -> JSONResponse:
    """The request that makes this job again with the same spec: ``request`` (every field),
    ``minimal`` (the fields off the library's defaults), the ``ssql submit`` command of it and
    ``ssql submit --from ID``. Send it to ``path``. Name, tags and notes are not copied; the
    source's files are pinned again (``input_sha256``) at submission."""
    row = await api_store.get_job(conn, owner, job_id)
    if row is None:
        raise HTTPException(404, NOT_FOUND)
    return JSONResponse(reproduce(row))
