"""Fair queueing: which queued job a free worker starts (issue 19 item 3, docs/decisions/019).

The broker's messages are wake-ups. A worker that receives any message claims, in the database,
the job this module chooses, not necessarily the message's own: the owner with the smallest share
goes first, and within an owner the job of highest ``priority``, then the oldest.

An owner's share, compared in this order (each divided by the owner's ``weight``, default 1):

1. the devices the owner's running jobs hold now;
2. the owner's recent device-time: device-seconds of its attempts (running ones up to now), each
   second weighted ``2 ** (-age / half_life)`` (``SSQL_FAIR_SHARE_HALF_LIFE_HOURS``, 24 h);
3. how long the owner has waited (its oldest queued job first), then its id.

With one worker (1) is 0 for everybody at every decision, so (2) decides: an owner that ran
nothing lately goes ahead of one that just ran fifty jobs. Starvation-free: a waiting owner's
device-time only decays while every owner picked ahead of it adds the time its job runs, so
it is picked after finitely many jobs that each hold a device for a positive time.

Decisions are taken one at a time (a transaction-level advisory lock on Postgres; SQLite
serialises writes anyway), so two workers freed together do not both pick the same owner on the
same numbers; the job row itself is taken with ``FOR UPDATE SKIP LOCKED`` and claimed by the
fenced :func:`persistence.job_store.claim`. Owners at their ``max_running_jobs`` /
``max_devices`` quota are skipped (decision 014) under their owner lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text
from sqlalchemy.orm import Session

from persistence import job_store, quotas
from persistence.db import as_utc, utcnow
from persistence.job_store import ClaimedJob
from persistence.models import Job, JobAttempt, OwnerQuota
from persistence.settings import Settings

#: the key of the advisory lock that makes claim decisions one at a time (Postgres)
DECISION_LOCK = 0x5353514C_46414952  # "SSQL" "FAIR"
#: attempts that ended longer than this many half-lives ago are not read (weight below 1/64)
HORIZON_HALF_LIVES = 6
#: the range of ``priority``
PRIORITY_MIN, PRIORITY_MAX = -100, 100


def claimable() -> Any:
    """Queued jobs a worker may take now."""
    return and_(Job.status == "queued", Job.cancel_requested.is_(False), Job.attempts < Job.max_attempts)


def devices_column() -> Any:
    """SQL for :func:`persistence.quotas.job_devices`: a pretrain job's ``config.devices``, else 1."""
    asked = Job.spec[("config", "devices")].as_integer()
    return case((Job.kind == "pretrain", func.coalesce(asked, 1)), else_=1)


def decayed_seconds(start: datetime, end: datetime, now: datetime, half_life_s: float) -> float:
    """``integral of 2 ** (-(now - t) / half_life) dt`` over ``[start, end]`` (clipped to now)."""
    end = min(end, now)
    if end <= start:
        return 0.0
    rate = math.log(2) / half_life_s
    return (math.exp(-rate * (now - end).total_seconds()) - math.exp(-rate * (now - start).total_seconds())) / rate


@dataclass(frozen=True)
class OwnerShare:
    """One owner with queued work, as the rule sees it."""

    owner_id: int
    weight: float
    running_devices: int
    #: decayed device-seconds
    recent_device_s: float
    waiting_since: datetime

    def key(self) -> tuple[float, float, datetime, int]:
        return (self.running_devices / self.weight, self.recent_device_s / self.weight, self.waiting_since, self.owner_id)


def shares(session: Session, settings: Settings, owners: dict[int, datetime] | None = None,
           now: datetime | None = None) -> list[OwnerShare]:
    """The owners with claimable jobs (or ``owners``: id -> waiting since), fairest first."""
    now = now or utcnow()
    if owners is None:
        rows = session.execute(select(Job.owner_id, func.min(Job.created_at)).where(claimable()).group_by(Job.owner_id))
        owners = {owner: as_utc(since) for owner, since in rows}
    if not owners:
        return []
    ids = list(owners)
    weights = dict(session.execute(select(OwnerQuota.owner_id, OwnerQuota.weight).where(OwnerQuota.owner_id.in_(ids))).all())
    running: dict[int, int] = dict.fromkeys(ids, 0)
    for owner, n in session.execute(select(Job.owner_id, devices_column()).where(Job.status == "running", Job.owner_id.in_(ids))):
        running[owner] += int(n or 1)
    half_life_s = settings.fair_share_half_life_hours * 3600.0
    since = now - timedelta(seconds=HORIZON_HALF_LIVES * half_life_s)
    recent: dict[int, float] = dict.fromkeys(ids, 0.0)
    attempts = session.execute(
        select(Job.owner_id, JobAttempt.started_at, JobAttempt.ended_at, devices_column())
        .join(Job, Job.id == JobAttempt.job_id)
        .where(Job.owner_id.in_(ids), or_(JobAttempt.ended_at.is_(None), JobAttempt.ended_at > since))
    )
    for owner, start, end, n in attempts:
        recent[owner] += decayed_seconds(as_utc(start), as_utc(end) or now, now, half_life_s) * int(n or 1)
    out = [OwnerShare(o, quotas.weight_of(weights.get(o)), running[o], recent[o], owners[o]) for o in ids]
    return sorted(out, key=OwnerShare.key)


def _next_job_of(session: Session, owner_id: int) -> Any:
    """The owner's next job (highest priority, then oldest), row-locked; one another worker has
    locked is skipped."""
    stmt = (
        select(Job.id, Job.kind, Job.spec)
        .where(Job.owner_id == owner_id, claimable())
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)
    )
    return session.execute(stmt).first()


@dataclass(frozen=True)
class Decision:
    """What a wake-up did: the job claimed (or None), and the owners skipped for their quota."""

    claimed: ClaimedJob | None
    held_owners: frozenset[int]


def claim_next(session: Session, settings: Settings, worker: str, lease_seconds: float) -> Decision:
    """Claim the job the fair-share rule picks now (committed), or nothing when no owner with
    queued work may start one."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DECISION_LOCK})
    held: set[int] = set()
    for share in shares(session, settings):
        job = _next_job_of(session, share.owner_id)
        if job is None:  # its jobs are being claimed or changed by someone else right now
            continue
        if quotas.start_hold(session, share.owner_id, job.kind, job.spec, settings) is not None:
            held.add(share.owner_id)
            continue
        claimed = job_store.claim(session, job.id, worker, lease_seconds)  # commits: locks released
        if claimed is not None:
            return Decision(claimed, frozenset(held))
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DECISION_LOCK})
    session.commit()
    return Decision(None, frozenset(held))
