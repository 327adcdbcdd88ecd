"""A job's chain: the jobs it was made from and the jobs made from it (``GET /v1/jobs/{id}/lineage``).

Jobs link through ``source_job_id`` (an eval, finetune or export of a pretrain; a distill or export
of an eval; an export of a finetune), so a chain is a tree rooted at a pretrain job. Every step
of every query is scoped to the owner: another owner's job never appears, whatever points at
what (submission already refuses another owner's source; this holds even for rows that do).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import RowMapping, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import aliased

from persistence.api_store import is_job_id
from persistence.models import Job

#: what a chain shows of each job
NODE_COLUMNS = (Job.id, Job.kind, Job.status, Job.name, Job.tags, Job.source_job_id, Job.spec, Job.created_at,
                Job.finished_at)
#: the deepest chain followed (today's longest is pretrain -> eval -> distill / export: 2)
MAX_DEPTH = 8


async def node(conn: AsyncConnection, owner_id: int, job_id: str) -> RowMapping | None:
    if not is_job_id(job_id):
        return None
    return (await conn.execute(select(*NODE_COLUMNS).where(Job.id == job_id, Job.owner_id == owner_id))).mappings().first()


async def ancestors(conn: AsyncConnection, owner_id: int, job: RowMapping) -> list[RowMapping]:
    """The jobs ``job`` was made from, its source first, then its source's source ..."""
    out: list[RowMapping] = []
    seen = {job["id"]}
    current = job
    while current["source_job_id"] is not None and len(out) < MAX_DEPTH:
        parent = await node(conn, owner_id, current["source_job_id"])
        if parent is None or parent["id"] in seen:
            break
        out.append(parent)
        seen.add(parent["id"])
        current = parent
    return out


async def children(conn: AsyncConnection, owner_id: int, job_id: str, limit: int) -> list[RowMapping]:
    """The owner's jobs made straight from ``job_id``, oldest first (at most ``limit``)."""
    stmt = (select(*NODE_COLUMNS).where(Job.source_job_id == job_id, Job.owner_id == owner_id)
            .order_by(Job.created_at, Job.id).limit(limit))
    return list((await conn.execute(stmt)).mappings().all())


async def tree(conn: AsyncConnection, owner_id: int, root_id: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Every job made from ``root_id`` (itself included), each with its ``depth`` below the root,
    depth-first (a job, then what was made from it, oldest first); True if more than ``limit``."""
    start = select(Job.id.label("id"), literal(0).label("depth")).where(Job.id == root_id, Job.owner_id == owner_id)
    walk = start.cte("chain", recursive=True)
    child = aliased(Job)
    walk = walk.union_all(select(child.id, walk.c.depth + 1).where(child.source_job_id == walk.c.id, child.owner_id == owner_id,
                                                                   walk.c.depth < MAX_DEPTH))
    stmt = (select(*NODE_COLUMNS, walk.c.depth).join(walk, walk.c.id == Job.id).where(Job.owner_id == owner_id)
            .order_by(walk.c.depth, Job.created_at, Job.id).limit(limit + 1))
    rows = [dict(r) for r in (await conn.execute(stmt)).mappings().all()]
    truncated = len(rows) > limit
    rows = rows[:limit]
    below: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        below.setdefault(r["source_job_id"], []).append(r)
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()
    stack = [r for r in rows if r["depth"] == 0]
    while stack:
        r = stack.pop()
        if r["id"] in seen:  # (a cycle cannot be submitted; a hand-edited row must not loop)
            continue
        seen.add(r["id"])
        ordered.append(r)
        stack.extend(reversed(below.get(r["id"], [])))
    return ordered, truncated
