"""Job state transitions used by the worker and the reconciler (synchronous sessions).

Every transition of a running job is fenced on ``(id, claims, status='running')``: ``claims`` is
the lease token, incremented by every claim, so a worker whose lease was taken over can no longer
write, and a job never has two live runs that both count. ``attempts`` counts the attempts spent
(capped by ``max_attempts``); an attempt handed back at a graceful worker stop gives it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from persistence.db import utcnow
from persistence.json_safe import finite_float, finite_json
from persistence.models import TERMINAL_STATUSES, Artifact, Job, JobAttempt, JobMetric, JobResult


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one attempt of a job it now owns.

    ``attempt`` is the lease token (``jobs.claims`` after the claim): unique per job, it numbers
    the attempt rows, metric samples and per-attempt work folders; ``spent`` is ``jobs.attempts``.
    """

    id: str
    kind: str
    spec: dict[str, Any]
    attempt: int
    source_job_id: str | None
    spent: int = 0


def claim(session: Session, job_id: str, worker: str, lease_seconds: float) -> ClaimedJob | None:
    """Atomically take a queued job, or a running one whose lease expired; None if someone owns it."""
    now = utcnow()
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            Job.attempts < Job.max_attempts,
            or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now)),
        )
        .values(
            status="running",
            attempts=Job.attempts + 1,
            claims=Job.claims + 1,
            lease_until=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            worker=worker,
            started_at=now,
            updated_at=now,
        )
        .returning(Job.id, Job.kind, Job.spec, Job.claims, Job.attempts, Job.source_job_id)
    )
    row = session.execute(stmt).first()
    if row is None:
        session.commit()
        return None
    # the attempts this claim supersedes (a worker that stopped heartbeating) are over
    _close_open_attempts(session, [row.id], now, below=row.claims)
    session.commit()
    return ClaimedJob(id=row.id, kind=row.kind, spec=row.spec, attempt=row.claims, source_job_id=row.source_job_id,
                      spent=row.attempts)  # fmt: skip


def _close_open_attempts(session: Session, job_ids: list[str], now: datetime, below: int | None = None) -> None:
    """Attempt rows still open of jobs whose lease was taken from them: ``outcome='lost'``."""
    if not job_ids:
        return
    where = [JobAttempt.job_id.in_(job_ids), JobAttempt.ended_at.is_(None)]
    if below is not None:
        where.append(JobAttempt.attempt < below)
    session.execute(update(JobAttempt).where(*where).values(ended_at=now, outcome="lost"))


def start_attempt(session: Session, job: ClaimedJob, worker: str, pid: int | None, resumed_from: str | None) -> None:
    session.add(
        JobAttempt(
            job_id=job.id, attempt=job.attempt, worker=worker, pid=pid, started_at=utcnow(), resumed_from=resumed_from
        )
    )
    session.commit()


def end_attempt(session: Session, job_id: str, attempt: int, outcome: str) -> None:
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
        .values(ended_at=utcnow(), outcome=outcome)
    )
    session.commit()


def _fence(job_id: str, attempt: int):  # type: ignore[no-untyped-def]
    return and_(Job.id == job_id, Job.claims == attempt, Job.status == "running")


def lock_fenced(session: Session, job_id: str, attempt: int) -> bool:
    """Take the job row's write lock if this attempt still holds the lease, and keep it (no
    commit): until the caller commits or rolls back, no claim can take the job over. Used to
    publish files only while the lease is ours."""
    now = utcnow()
    row = session.execute(
        update(Job).where(_fence(job_id, attempt)).values(heartbeat_at=now).returning(Job.id)
    ).first()
    if row is None:
        session.rollback()
    return row is not None


def hand_back(session: Session, job_id: str, attempt: int, progress: dict[str, Any] | None = None,
              error: dict[str, Any] | None = None) -> bool:
    """A graceful worker stop, or an infrastructure fault that is not the job's (the object store
    unreachable: ``error`` says so): the job goes back to the queue and the attempt is not spent."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": "queued",
        "attempts": Job.attempts - 1,
        "lease_until": None,
        "worker": None,
        "published_at": None,
        "updated_at": now,
    }
    if progress is not None:
        values["progress"] = finite_json(progress)
    if error is not None:
        values["error"] = finite_json(error)
    row = session.execute(update(Job).where(_fence(job_id, attempt)).values(**values).returning(Job.id)).first()
    session.commit()
    return row is not None


def heartbeat(
    session: Session, job_id: str, attempt: int, lease_seconds: float, progress: dict[str, Any] | None = None
) -> bool | None:
    """Extend the lease. Returns the job's cancel flag, or None when the lease is no longer ours."""
    now = utcnow()
    values: dict[str, Any] = {"lease_until": now + timedelta(seconds=lease_seconds), "heartbeat_at": now}
    if progress is not None:
        values["progress"] = finite_json(progress)
        values["updated_at"] = now
    row = session.execute(update(Job).where(_fence(job_id, attempt)).values(**values).returning(Job.cancel_requested)).first()
    session.commit()
    return None if row is None else bool(row[0])


def add_metrics(session: Session, job_id: str, attempt: int, samples: list[dict[str, Any]]) -> None:
    """Append progress samples (loss, lr, images/s) to the job's metric history.

    Non-finite numbers are stored as null (a NaN loss must not break the heartbeat, nor the
    API's JSON rendering of the history)."""
    if not samples:
        return
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "attempt": attempt,
            "phase": s.get("phase") or "",
            "epoch": _as_int(s.get("epoch")),
            "step": _as_int(s.get("step")),
            "loss": _as_float(s.get("loss")),
            "lr": _as_float(s.get("lr")),
            "images_per_s": _as_float(s.get("images_per_s")),
            "extra": finite_json(s.get("metrics")) or None,
            "created_at": now,
        }
        for s in samples
    ]
    session.execute(insert(JobMetric), rows)
    session.commit()


_INT32 = 2**31 - 1


def _as_int(value: Any) -> int:
    """An Integer column's value from a runner's event: 0 when missing, non-finite or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    value = finite_float(value)
    if value is None:
        return 0
    return max(-_INT32, min(_INT32, int(value)))


def _as_float(value: Any) -> float | None:
    """A Float column's value: None when missing, not a number, or non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return finite_float(float(value))
    except OverflowError:  # an int beyond the float range
        return None


@dataclass(frozen=True)
class ArtifactRecord:
    """A produced file, already hashed; ``path`` is relative to the artifacts directory.

    ``job_id``: the job it is served under, when not the job that produced it (export jobs).
    """

    bits: str
    format: str
    path: str
    bytes: int
    sha256: str
    job_id: str | None = None


def finish(
    session: Session,
    job_id: str,
    attempt: int,
    status: str,
    *,
    summary: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    results: list[dict[str, Any]] | None = None,
    artifacts: list[ArtifactRecord] | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Move a running job to a terminal status with its outputs, and close its attempt's row with
    the status as outcome, in one transaction (fenced)."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "summary": finite_json(summary),
        "error": finite_json(error),
        "finished_at": now,
        "updated_at": now,
        "lease_until": None,
    }
    if progress is not None:
        values["progress"] = finite_json(progress)
    row = session.execute(update(Job).where(_fence(job_id, attempt)).values(**values).returning(Job.id)).first()
    if row is None:
        session.rollback()
        return False
    # the attempt's row closes with the job, so no reader sees a finished job with a running attempt
    # (the supervisor's end_attempt afterwards may name the outcome more precisely)
    session.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt,
                                             JobAttempt.ended_at.is_(None)).values(ended_at=now, outcome=status))
    for r in results or []:
        r = finite_json(r)
        session.add(
            JobResult(
                job_id=job_id,
                bits=str(r.get("bits")),
                protocol=str(r.get("protocol", "")),
                top1=_as_float(r.get("top1")),
                row=r,
                created_at=now,
            )
        )
    for a in artifacts or []:
        row = Artifact(job_id=a.job_id or job_id, bits=a.bits, format=a.format, path=a.path, bytes=a.bytes, sha256=a.sha256,
                       produced_by=job_id if a.job_id else None, created_at=now)  # fmt: skip
        if a.job_id is None:
            session.add(row)
            continue
        # served under another job (an export): that job may already have this file from an
        # earlier export, which keeps being served (its sha256 is already in users' hands)
        taken = select(Artifact.id).where(Artifact.job_id == a.job_id, Artifact.bits == a.bits, Artifact.format == a.format)
        if session.execute(taken).first() is not None:
            continue
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            pass
    session.commit()
    return True


def requeue(session: Session, job_id: str, attempt: int, error: dict[str, Any]) -> bool:
    """Give a running attempt back to the queue (it will resume from its last checkpoint)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(_fence(job_id, attempt))
        .values(status="queued", lease_until=None, error=finite_json(error), published_at=None, updated_at=now)
        .returning(Job.id)
    ).first()
    session.commit()
    return row is not None


def reap_expired(session: Session, now: datetime | None = None) -> tuple[list[str], list[str]]:
    """Jobs whose heartbeat stopped: requeue those with attempts left, fail the others.

    Returns ``(requeued_ids, failed_ids)``.
    """
    now = now or utcnow()
    expired = and_(Job.status == "running", Job.lease_until < now)
    failed = session.execute(
        update(Job)
        .where(expired, Job.attempts >= Job.max_attempts)
        .values(
            status="failed",
            finished_at=now,
            updated_at=now,
            lease_until=None,
            error={
                "code": "worker_lost",
                "message": "the worker running this job stopped responding (killed, out of memory or lost) "
                "and the job has used all its attempts",
            },
        )
        .returning(Job.id)
    ).scalars().all()
    requeued = session.execute(
        update(Job)
        .where(expired, Job.attempts < Job.max_attempts)
        .values(
            status="queued",
            lease_until=None,
            published_at=None,
            updated_at=now,
            error={"code": "worker_lost", "message": "the previous attempt's worker stopped responding; retrying"},
        )
        .returning(Job.id)
    ).scalars().all()
    _close_open_attempts(session, [*failed, *requeued], now)
    # Cancelled while nobody runs it: finish the cancellation here.
    session.execute(
        update(Job)
        .where(Job.status == "queued", Job.cancel_requested.is_(True))
        .values(status="cancelled", finished_at=now, updated_at=now)
    )
    session.commit()
    return list(requeued), list(failed)


def recently_finished(session: Session, within_seconds: float, limit: int = 1000) -> list[str]:
    """Jobs that ended in the last ``within_seconds`` after at least one claim (their attempt
    folders, if any were left, can go: no attempt follows a terminal status)."""
    since = utcnow() - timedelta(seconds=within_seconds)
    return list(session.scalars(
        select(Job.id).where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at >= since, Job.claims > 0).limit(limit)))


def stale_queued(session: Session, older_than_seconds: float, limit: int = 500) -> list[str]:
    """Queued jobs never published, or published long ago (their message may be lost)."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status == "queued", or_(Job.published_at.is_(None), Job.published_at < cutoff))
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


def mark_published(session: Session, job_ids: list[str]) -> None:
    if job_ids:
        now = utcnow()
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(published_at=now))
        session.commit()



def job_flags(session: Session, job_id: str) -> tuple[bool, int]:
    """``(cancel_requested, max_attempts)`` as currently stored."""
    row = session.execute(select(Job.cancel_requested, Job.max_attempts).where(Job.id == job_id)).one()
    return bool(row.cancel_requested), int(row.max_attempts)
