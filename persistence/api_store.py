"""Queries of the HTTP API (asyncio). Every read filters on the owner so ids cannot be probed.

Hot paths (key lookup, job status) use Core statements on a pooled connection, no ORM session.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import RowMapping, delete, func, insert, nulls_last, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.db import utcnow
from persistence.models import ApiKey, Artifact, Job, JobMetric, JobResult, JobTag

JOB_COLUMNS = (
    Job.id,
    Job.kind,
    Job.status,
    Job.spec,
    Job.source_job_id,
    Job.attempts,
    Job.max_attempts,
    Job.cancel_requested,
    Job.progress,
    Job.summary,
    Job.error,
    Job.created_at,
    Job.updated_at,
    Job.started_at,
    Job.finished_at,
    Job.name,
    Job.tags,
    Job.notes,
    Job.priority,
)


#: ``artifacts.format`` of a file later jobs read (a pretrain's last.pt, an eval's heads.pt;
#: ``bits`` holds the file name): registered with its sha256 so readers can verify it, but never
#: listed nor served (docs/decisions/011)
INPUT_FORMAT = "input"

#: the longest job id (a uuid4 string; the column is String(36))
MAX_JOB_ID_CHARS = 36


def is_job_id(value: object) -> bool:
    """Whether ``value`` can be a job id at all: printable ASCII of at most 36 characters.

    Anything else (a NUL byte, a lone surrogate, a megabyte of text) names no job, and some of it
    the database driver cannot even send (Postgres text holds no NUL; UTF-8 no lone surrogate):
    callers answer "not found" without a query."""
    return isinstance(value, str) and 0 < len(value) <= MAX_JOB_ID_CHARS and value.isascii() and value.isprintable()


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


async def owner_for_key(conn: AsyncConnection, key_hash: str) -> int | None:
    row = (
        await conn.execute(select(ApiKey.user_id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    ).first()
    return None if row is None else int(row[0])


async def revoke_key(conn: AsyncConnection, owner_id: int, key_hash: str) -> bool:
    """Revoke one of the owner's keys and commit; on Postgres the API processes are notified in
    the same transaction (``persistence.keys.REVOKED_CHANNEL``, by the table's trigger: migration
    0004) and forget it at once."""
    stmt = (
        update(ApiKey)
        .where(ApiKey.key_hash == key_hash, ApiKey.user_id == owner_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiKey.id)
    )
    revoked = (await conn.execute(stmt)).first() is not None
    await conn.commit()
    return revoked


#: the most keys one owner may hold unrevoked (``POST /v1/keys`` beyond it: 409)
MAX_ACTIVE_KEYS = 100
KEY_COLUMNS = (ApiKey.id, ApiKey.prefix, ApiKey.label, ApiKey.created_at, ApiKey.revoked_at, ApiKey.key_hash)


async def list_keys(conn: AsyncConnection, owner_id: int) -> list[RowMapping]:
    """The owner's keys, newest first (hashes for the caller to mark the current one; never secrets)."""
    stmt = select(*KEY_COLUMNS).where(ApiKey.user_id == owner_id).order_by(ApiKey.id.desc())
    return list((await conn.execute(stmt)).mappings().all())


async def add_key(conn: AsyncConnection, owner_id: int, key_hash: str, prefix: str, label: str | None) -> RowMapping | None:
    """A new key of the owner (its hash), committed; None when the owner holds MAX_ACTIVE_KEYS already."""
    active = (await conn.execute(select(func.count()).where(ApiKey.user_id == owner_id, ApiKey.revoked_at.is_(None)))).scalar_one()
    if active >= MAX_ACTIVE_KEYS:
        return None
    stmt = (insert(ApiKey).values(user_id=owner_id, key_hash=key_hash, prefix=prefix, label=label, created_at=utcnow())
            .returning(*KEY_COLUMNS))
    row = (await conn.execute(stmt)).mappings().one()
    await conn.commit()
    return row


async def revoke_key_by_id(conn: AsyncConnection, owner_id: int, key_id: int) -> RowMapping | None:
    """Revoke the owner's key ``key_id`` (already revoked: unchanged) and commit; None if the owner
    has no such key. The table's trigger notifies the other API processes (migration 0004)."""
    now = utcnow()
    await conn.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == owner_id, ApiKey.revoked_at.is_(None))
                       .values(revoked_at=now))
    row = (await conn.execute(select(*KEY_COLUMNS).where(ApiKey.id == key_id, ApiKey.user_id == owner_id))).mappings().first()
    await conn.commit()
    return row


async def get_job(conn: AsyncConnection, owner_id: int, job_id: str) -> RowMapping | None:
    if not is_job_id(job_id):
        return None
    return (await conn.execute(select(*JOB_COLUMNS).where(Job.id == job_id, Job.owner_id == owner_id))).mappings().first()


async def find_by_idempotency_key(conn: AsyncConnection, owner_id: int, key: str) -> RowMapping | None:
    stmt = select(*JOB_COLUMNS, Job.request_hash).where(Job.owner_id == owner_id, Job.idempotency_key == key)
    return (await conn.execute(stmt)).mappings().first()


async def create_job(
    conn: AsyncConnection,
    *,
    job_id: str,
    owner_id: int,
    kind: str,
    spec: dict[str, Any],
    source_job_id: str | None,
    idempotency_key: str | None,
    request_hash: str,
    max_attempts: int,
    labels: dict[str, Any] | None = None,
) -> tuple[RowMapping, bool]:
    """Insert a queued job and commit. Returns ``(job, created)``; a replayed key returns the old job."""
    if idempotency_key is not None:
        existing = await find_by_idempotency_key(conn, owner_id, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash)
    now = utcnow()
    try:
        # published_at is set optimistically: the caller publishes right after the commit and
        # clears it (mark_unpublished) only if that fails, saving a round trip per submission.
        job = (
            await conn.execute(
                insert(Job)
                .values(
                    id=job_id,
                    owner_id=owner_id,
                    kind=kind,
                    status="queued",
                    spec=spec,
                    source_job_id=source_job_id,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                    attempts=0,
                    max_attempts=max_attempts,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                    published_at=now,
                    **(labels or {}),
                )
                .returning(*JOB_COLUMNS)
            )
        ).mappings().one()
        await _write_tags(conn, job_id, owner_id, (labels or {}).get("tags"))
        await conn.commit()
    except IntegrityError:
        await conn.rollback()
        if idempotency_key is None:
            raise
        existing = await find_by_idempotency_key(conn, owner_id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, request_hash)
    return job, True


def _replay(existing: RowMapping, request_hash: str) -> tuple[RowMapping, bool]:
    if existing["request_hash"] != request_hash:
        raise IdempotencyConflict()
    return existing, False


async def mark_unpublished(conn: AsyncConnection, job_id: str) -> None:
    """Publishing failed: let the reconciler's next round publish the job."""
    await conn.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(published_at=None))
    await conn.commit()


async def _write_tags(conn: AsyncConnection, job_id: str, owner_id: int, tags: list[str] | None) -> None:
    await conn.execute(delete(JobTag).where(JobTag.job_id == job_id))
    if tags:
        await conn.execute(insert(JobTag), [{"job_id": job_id, "owner_id": owner_id, "tag": t} for t in tags])


async def update_labels(conn: AsyncConnection, owner_id: int, job_id: str, changes: dict[str, Any]) -> RowMapping | None:
    """Set a job's name / tags / notes (only the keys given); None if it is not the owner's."""
    if not is_job_id(job_id):
        return None
    done = await conn.execute(update(Job).where(Job.id == job_id, Job.owner_id == owner_id).values(**changes, updated_at=utcnow()))
    if done.rowcount == 0:
        await conn.rollback()
        return None
    if "tags" in changes:
        await _write_tags(conn, job_id, owner_id, changes["tags"])
    await conn.commit()
    return await get_job(conn, owner_id, job_id)


#: sortable columns of the job list (``sort=name``, ``sort=-created_at``); ``top1:<bits>`` sorts by a result
SORT_COLUMNS = {"created_at": Job.created_at, "updated_at": Job.updated_at, "started_at": Job.started_at,
                "finished_at": Job.finished_at, "name": func.lower(Job.name), "kind": Job.kind, "status": Job.status}


async def list_jobs(
    conn: AsyncConnection, owner_id: int, status: str | None, kind: str | None, limit: int, offset: int,
    *, method: str | None = None, dataset: str | None = None, tags: list[str] | None = None, q: str | None = None,
    sort: str = "created_at", descending: bool = True, metric_bits: str | None = None,
) -> list[RowMapping]:
    """The owner's jobs matching every filter given (``tags``: all of them; ``q``: in the name,
    the notes or the id's start), sorted by ``sort`` (or the top-1 at ``metric_bits``, jobs without
    one last), then newest first."""
    stmt = select(*JOB_COLUMNS).where(Job.owner_id == owner_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if method:
        stmt = stmt.where(Job.spec["config"]["method"].as_string() == method)
    if dataset:
        stmt = stmt.where(Job.spec["config"]["dataset"].as_string() == dataset)
    for tag in tags or []:
        stmt = stmt.where(Job.id.in_(select(JobTag.job_id).where(JobTag.owner_id == owner_id, JobTag.tag == tag)))
    if q:
        needle = q.lower()
        stmt = stmt.where(or_(func.lower(Job.name).contains(needle, autoescape=True),
                              func.lower(Job.notes).contains(needle, autoescape=True),
                              Job.id.startswith(needle, autoescape=True)))
    if metric_bits is not None:
        top1 = (select(func.max(JobResult.top1)).where(JobResult.job_id == Job.id, JobResult.bits == metric_bits)
                .correlate(Job).scalar_subquery())
        key = nulls_last(top1.desc() if descending else top1.asc())
    else:
        column = SORT_COLUMNS[sort]
        key = nulls_last(column.desc() if descending else column.asc())
    stmt = stmt.order_by(key, Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
    return list((await conn.execute(stmt)).mappings().all())


async def request_cancel(conn: AsyncConnection, owner_id: int, job_id: str) -> RowMapping | None:
    """Queued: cancelled at once. Running: flag for the worker. Returns the job after the change."""
    if not is_job_id(job_id):
        return None
    now = utcnow()
    mine = (Job.id == job_id, Job.owner_id == owner_id)
    await conn.execute(
        update(Job)
        .where(*mine, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    await conn.execute(update(Job).where(*mine, Job.status == "running").values(cancel_requested=True, updated_at=now))
    await conn.commit()
    return await get_job(conn, owner_id, job_id)


async def job_exists(conn: AsyncConnection, owner_id: int, job_id: str) -> bool:
    if not is_job_id(job_id):
        return False
    row = (await conn.execute(select(func.count()).where(Job.id == job_id, Job.owner_id == owner_id))).scalar_one()
    return bool(row)


async def metrics(conn: AsyncConnection, job_id: str, after: int, limit: int) -> list[RowMapping]:
    stmt = (
        select(
            JobMetric.id,
            JobMetric.attempt,
            JobMetric.phase,
            JobMetric.epoch,
            JobMetric.step,
            JobMetric.loss,
            JobMetric.lr,
            JobMetric.images_per_s,
            JobMetric.extra,
            JobMetric.created_at,
        )
        .where(JobMetric.job_id == job_id, JobMetric.id > after)
        .order_by(JobMetric.id)
        .limit(limit)
    )
    return list((await conn.execute(stmt)).mappings().all())


async def results(conn: AsyncConnection, job_id: str) -> list[RowMapping]:
    stmt = select(JobResult.bits, JobResult.protocol, JobResult.top1, JobResult.row).where(JobResult.job_id == job_id)
    return list((await conn.execute(stmt.order_by(JobResult.id))).mappings().all())


async def artifacts(conn: AsyncConnection, job_id: str) -> list[RowMapping]:
    stmt = select(
        Artifact.bits, Artifact.format, Artifact.path, Artifact.bytes, Artifact.sha256, Artifact.produced_by, Artifact.created_at
    )
    stmt = stmt.where(Artifact.job_id == job_id, Artifact.format != INPUT_FORMAT)
    return list((await conn.execute(stmt.order_by(Artifact.id))).mappings().all())


async def input_digests(conn: AsyncConnection, job_id: str) -> dict[str, str]:
    """file name -> sha256 of the registered input files (``last.pt``, ``heads.pt``) of a job."""
    stmt = select(Artifact.bits, Artifact.sha256).where(Artifact.job_id == job_id, Artifact.format == INPUT_FORMAT)
    return {r.bits: r.sha256 for r in (await conn.execute(stmt)).all()}


async def source_job(conn: AsyncConnection, owner_id: int, job_id: str) -> RowMapping | None:
    if not is_job_id(job_id):
        return None
    stmt = select(Job.id, Job.kind, Job.status, Job.spec, Job.source_job_id).where(Job.id == job_id, Job.owner_id == owner_id)
    return (await conn.execute(stmt)).mappings().first()
