"""Quotas per owner: what an owner may hold at once and spend per rolling period (decision 014).

* ``max_active_jobs``: queued + running jobs; a submit over it is refused (429) and nothing is queued.
* ``device_hours`` per ``period_hours`` (rolling): device-time of the owner's attempts that falls
  in the window; a submit while it is used up is refused (403).
* ``max_running_jobs`` and ``max_devices``: enforced where a worker claims a job (a job over them
  stays queued, :func:`start_hold`), so a submit is not refused for them; a job that asks for more
  devices than the owner may ever hold is refused at submission (403).

Limits: an owner's row in ``owner_quotas`` (``ssql owners set-quota``) over the server's defaults
(``SSQL_QUOTA_*``); null = the default, negative = no limit. The API (asyncio connection) and the
worker and CLI (sessions) read the same statements; the arithmetic is plain Python on their rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from persistence.db import as_utc, utcnow
from persistence.models import Job, JobAttempt, OwnerQuota, User
from persistence.settings import Settings

#: the quotas an operator sets, in the order they are shown
QUOTA_FIELDS = ("max_active_jobs", "max_running_jobs", "max_devices", "device_hours", "period_hours", "weight")
#: how long a client is told to wait when nothing better is known (seconds)
DEFAULT_RETRY_S = 60


@dataclass(frozen=True)
class Limits:
    """Effective limits of one owner (None: no limit)."""

    max_active_jobs: int | None
    max_running_jobs: int | None
    max_devices: int | None
    device_hours: float | None
    period_hours: float
    #: fair-share weight (decision 019): not a limit, the owner's share of the devices when several wait
    weight: float = 1.0


@dataclass(frozen=True)
class Usage:
    active_jobs: int
    running_jobs: int
    devices: int
    device_hours: float


def job_devices(kind: str, spec: dict[str, Any] | None) -> int:
    """Devices a job holds while it runs: a pretrain job's ``devices`` (DDP), else one."""
    if kind == "pretrain":
        value = ((spec or {}).get("config") or {}).get("devices")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 1


def _limit(own: Any, default: Any) -> Any:
    if own is None:
        return default
    return None if own < 0 else own


def limits_of(row: Any, settings: Settings) -> Limits:
    """The owner's ``owner_quotas`` row (or None) over the server's defaults."""
    get = (lambda name: getattr(row, name)) if row is not None else (lambda _name: None)
    period = get("period_hours")
    return Limits(
        max_active_jobs=_limit(get("max_active_jobs"), settings.quota_max_active_jobs),
        max_running_jobs=_limit(get("max_running_jobs"), settings.quota_max_running_jobs),
        max_devices=_limit(get("max_devices"), settings.quota_max_devices),
        device_hours=_limit(get("device_hours"), settings.quota_device_hours),
        period_hours=period if period is not None and period > 0 else settings.quota_period_hours,
        weight=weight_of(get("weight")),
    )


def weight_of(value: float | None) -> float:
    """An owner's fair-share weight: its own (above 0), else 1."""
    return value if value is not None and value > 0 else 1.0


# -- the statements (one place for both ends) -------------------------------------------------------


def quota_stmt(owner_id: int, lock: bool = False) -> Select:
    """The owner's quota row. ``lock``: also lock the owner's ``users`` row (Postgres), so that
    submissions and claims of one owner are decided one at a time (no two pass one free slot)."""
    cols = [getattr(OwnerQuota, f) for f in QUOTA_FIELDS]
    stmt = select(User.id, *cols).outerjoin(OwnerQuota, OwnerQuota.owner_id == User.id).where(User.id == owner_id)
    # FOR NO KEY UPDATE: serialises these decisions without blocking inserts that reference the user
    return stmt.with_for_update(of=User, key_share=True) if lock else stmt


def active_stmt(owner_id: int, exclude: str | None = None) -> Select:
    stmt = select(Job.id, Job.kind, Job.status, Job.spec, Job.progress).where(
        Job.owner_id == owner_id, Job.status.in_(("queued", "running")))
    return stmt.where(Job.id != exclude) if exclude is not None else stmt


def attempts_stmt(owner_id: int, since: datetime) -> Select:
    """The owner's attempts that overlap the window starting at ``since``."""
    return (
        select(JobAttempt.started_at, JobAttempt.ended_at, Job.kind, Job.spec)
        .join(Job, Job.id == JobAttempt.job_id)
        .where(Job.owner_id == owner_id, or_(JobAttempt.ended_at.is_(None), JobAttempt.ended_at > since))
    )


# -- arithmetic -----------------------------------------------------------------------------------------


def _intervals(attempts: list[Any], now: datetime) -> list[tuple[datetime, datetime, int]]:
    """(start, end, devices) of each attempt; one still open ends now."""
    out = []
    for a in attempts:
        start, end = as_utc(a.started_at), as_utc(a.ended_at) or now
        if start is not None and end > start:
            out.append((start, min(end, now), job_devices(a.kind, a.spec)))
    return out


def _hours_in(intervals: list[tuple[datetime, datetime, int]], since: datetime) -> float:
    return sum(max(0.0, (end - max(start, since)).total_seconds()) * n for start, end, n in intervals) / 3600.0


def usage_of(active: list[Any], attempts: list[Any], limits: Limits, now: datetime) -> Usage:
    running = [j for j in active if j.status == "running"]
    since = now - timedelta(hours=limits.period_hours)
    return Usage(
        active_jobs=len(active),
        running_jobs=len(running),
        devices=sum(job_devices(j.kind, j.spec) for j in running),
        device_hours=round(_hours_in(_intervals(attempts, now), since), 6),
    )


def budget_frees_at(attempts: list[Any], limits: Limits, now: datetime) -> datetime | None:
    """When the device-hours in the window fall below the budget again if nothing more ran (the
    running attempts counted up to now): old usage leaves the rolling window. None: not used up."""
    if limits.device_hours is None:
        return None
    intervals = _intervals(attempts, now)
    period = timedelta(hours=limits.period_hours)

    def used(t: datetime) -> float:
        return _hours_in(intervals, t - period)

    if used(now) < limits.device_hours:
        return None
    # used(t) falls piecewise linearly; its kinks are where an interval's start or end leaves the window
    points = sorted({p + period for s, e, _ in intervals for p in (s, e) if p + period > now})
    prev = now
    for t in points:
        if used(t) < limits.device_hours:
            lo, hi = prev, t  # bisect inside the last linear piece: exact to a second
            while (hi - lo).total_seconds() > 1:
                mid = lo + (hi - lo) / 2
                lo, hi = (lo, mid) if used(mid) < limits.device_hours else (mid, hi)
            return hi
        prev = t
    return points[-1] if points else now


def _running_eta_s(active: list[Any]) -> float | None:
    etas = [(j.progress or {}).get("eta_s") for j in active if j.status == "running"]
    etas = [e for e in etas if isinstance(e, (int, float)) and math.isfinite(e) and e >= 0]
    return min(etas) if etas else None


@dataclass(frozen=True)
class QuotaRefusal:
    """Why a submission is refused: the HTTP status, the quota, its limit, the usage, when it frees."""

    status: int
    quota: str
    limit: float
    usage: float
    message: str
    frees_at: datetime | None = None
    retry_after_s: int = DEFAULT_RETRY_S

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "code": "quota_exceeded" if self.status == 429 else "quota_forbidden",
                "quota": self.quota, "limit": self.limit, "usage": self.usage,
                "frees_at": None if self.frees_at is None else self.frees_at.isoformat(),
                "retry_after_s": self.retry_after_s}  # fmt: skip


def submission_refusal(active: list[Any], attempts: list[Any], limits: Limits, new_devices: int,
                       now: datetime) -> QuotaRefusal | None:
    """Whether a new job of ``new_devices`` may be queued for this owner (None: yes)."""
    usage = usage_of(active, attempts, limits, now)
    if limits.max_devices is not None and new_devices > limits.max_devices:
        return QuotaRefusal(403, "max_devices", limits.max_devices, new_devices,
                            f"this job asks for {new_devices} devices and your quota max_devices is {limits.max_devices}: "
                            "it could never run; ask for fewer devices or ask an operator to raise the quota")  # fmt: skip
    for name in ("max_active_jobs", "max_running_jobs"):  # 0: the owner is suspended, waiting will not help
        if getattr(limits, name) == 0:
            return QuotaRefusal(403, name, 0, usage.active_jobs if name == "max_active_jobs" else usage.running_jobs,
                                f"your quota {name} is 0: no job of yours may be queued or run; ask an operator")
    if limits.device_hours is not None and usage.device_hours >= limits.device_hours:
        frees = budget_frees_at(attempts, limits, now)
        wait = max(1, math.ceil((frees - now).total_seconds())) if frees else DEFAULT_RETRY_S
        return QuotaRefusal(403, "device_hours", limits.device_hours, usage.device_hours,
                            f"your compute budget is used up: {usage.device_hours:.3f} of {limits.device_hours:g} "
                            f"device-hours in the last {limits.period_hours:g} hours; it frees as that usage leaves "
                            f"the window" + (f", from {frees.isoformat()}" if frees else ""), frees, wait)  # fmt: skip
    if limits.max_active_jobs is not None and usage.active_jobs >= limits.max_active_jobs:
        eta = _running_eta_s(active)
        wait = max(1, math.ceil(eta)) if eta is not None else DEFAULT_RETRY_S
        return QuotaRefusal(429, "max_active_jobs", limits.max_active_jobs, usage.active_jobs,
                            f"you have {usage.active_jobs} queued or running jobs, your quota max_active_jobs is "
                            f"{limits.max_active_jobs}: a slot frees when one of them ends or is cancelled"
                            + (f" (the next is expected in about {wait} s)" if eta is not None else ""),
                            now + timedelta(seconds=eta) if eta is not None else None, wait)  # fmt: skip
    return None


def run_hold(active: list[Any], limits: Limits, devices: int) -> str | None:
    """Why a job of ``devices`` may not start now for an owner whose other jobs are ``active``
    (None: it may). Checked by the worker under the owner's lock, before the claim."""
    usage = usage_of(active, [], limits, utcnow())
    if limits.max_running_jobs is not None and usage.running_jobs >= limits.max_running_jobs:
        return f"max_running_jobs {limits.max_running_jobs} reached ({usage.running_jobs} running)"
    if limits.max_devices is not None and usage.devices + devices > limits.max_devices:
        return f"max_devices {limits.max_devices} reached ({usage.devices} held, this job needs {devices})"
    return None


def view(limits: Limits, usage: Usage, refusal_now: QuotaRefusal | None, frees_at: datetime | None) -> dict[str, Any]:
    """``GET /v1/usage``: limits, usage, and what a submission would get now."""
    return {"limits": asdict(limits), "usage": asdict(usage),
            "budget_frees_at": None if frees_at is None else frees_at.isoformat(),
            "can_submit": refusal_now is None,
            "refusal": None if refusal_now is None else refusal_now.body()}  # fmt: skip


# -- the API's side (an asyncio connection) -------------------------------------------------------------


async def submission_check(conn: AsyncConnection, owner_id: int, settings: Settings, devices: int) -> QuotaRefusal | None:
    """Whether the owner may queue one more job of ``devices`` (None: yes). On Postgres the
    owner's row stays locked until the caller's transaction ends (the insert's commit), so two
    concurrent submissions cannot both take the last slot."""
    limits = limits_of((await conn.execute(quota_stmt(owner_id))).first(), settings)
    if (limits.max_active_jobs is None and limits.device_hours is None and limits.max_devices is None
            and limits.max_running_jobs != 0):
        return None
    if conn.dialect.name == "postgresql":
        limits = limits_of((await conn.execute(quota_stmt(owner_id, lock=True))).first(), settings)
    now = utcnow()
    active = (await conn.execute(active_stmt(owner_id))).all()
    attempts = []
    if limits.device_hours is not None:
        attempts = list((await conn.execute(attempts_stmt(owner_id, now - timedelta(hours=limits.period_hours)))).all())
    return submission_refusal(active, attempts, limits, devices, now)


async def usage_view(conn: AsyncConnection, owner_id: int, settings: Settings) -> dict[str, Any]:
    """``GET /v1/usage`` of one owner."""
    limits = limits_of((await conn.execute(quota_stmt(owner_id))).first(), settings)
    now = utcnow()
    active = (await conn.execute(active_stmt(owner_id))).all()
    attempts = list((await conn.execute(attempts_stmt(owner_id, now - timedelta(hours=limits.period_hours)))).all())
    usage = usage_of(active, attempts, limits, now)
    return view(limits, usage, submission_refusal(active, attempts, limits, 1, now), budget_frees_at(attempts, limits, now))


# -- the worker's side (a session) ----------------------------------------------------------------------


def start_hold(session: Session, owner_id: int, kind: str, spec: dict[str, Any] | None, settings: Settings) -> str | None:
    """Before a worker claims a job of ``owner_id``: lock the owner (Postgres) and say why the
    job must wait (the owner's running jobs or devices at their quota), or None. The caller claims
    in the same transaction, so the lock decides one claim of an owner at a time."""
    limits = limits_of(session.execute(quota_stmt(owner_id)).first(), settings)
    if limits.max_running_jobs is None and limits.max_devices is None:
        return None  # nothing to decide: no lock taken
    if session.get_bind().dialect.name == "postgresql":
        limits = limits_of(session.execute(quota_stmt(owner_id, lock=True)).first(), settings)
    running = session.execute(active_stmt(owner_id).where(Job.status == "running")).all()
    return run_hold(running, limits, job_devices(kind, spec))


def mark_held(session: Session, job_id: str) -> None:
    """A job left queued by its owner's quota: unpublished, so the reconciler publishes it again
    (its next round after a running job of the owner ends)."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(published_at=None))


def held_by_quota(session: Session, job_ids: list[str], settings: Settings) -> set[str]:
    """Of these queued jobs, those whose owner is at a running-jobs or devices quota now (the
    reconciler does not republish them: a worker would only leave them queued again)."""
    held: set[str] = set()
    rows = session.execute(select(Job.id, Job.owner_id, Job.kind, Job.spec).where(Job.id.in_(job_ids))).all()
    by_owner: dict[int, list[Any]] = {}
    for r in rows:
        by_owner.setdefault(r.owner_id, []).append(r)
    for owner_id, jobs in by_owner.items():
        limits = limits_of(session.execute(quota_stmt(owner_id)).first(), settings)
        if limits.max_running_jobs is None and limits.max_devices is None:
            continue
        running = session.execute(active_stmt(owner_id).where(Job.status == "running")).all()
        held.update(j.id for j in jobs if run_hold(running, limits, job_devices(j.kind, j.spec)) is not None)
    return held


# -- the operator's side (ssql owners) --------------------------------------------------------------------


def set_quota(session: Session, user_name: str, values: dict[str, float | int | None]) -> dict[str, Any]:
    """Set some of ``user_name``'s quotas (None: back to the server's default; negative: no limit)
    and commit; returns the owner's row after the change. Unknown user: LookupError."""
    unknown = set(values) - set(QUOTA_FIELDS)
    if unknown:
        raise ValueError(f"unknown quota {sorted(unknown)}; known: {list(QUOTA_FIELDS)}")
    if values.get("period_hours") is not None and values["period_hours"] <= 0:  # type: ignore[operator]
        raise ValueError("period_hours must be above 0")
    weight = values.get("weight")
    if weight is not None and not (0 < weight <= 1000):  # type: ignore[operator]
        raise ValueError("weight must be above 0 and at most 1000 (1: an equal share; 'default' sets it back to 1)")
    user = session.scalar(select(User).where(User.name == user_name))
    if user is None:
        raise LookupError(f"no user {user_name!r} (users are made by `ssql keys create NAME`)")
    row = session.get(OwnerQuota, user.id)
    if row is None:
        row = OwnerQuota(owner_id=user.id, updated_at=utcnow())
        session.add(row)
    for name, value in values.items():
        setattr(row, name, value)
    row.updated_at = utcnow()
    session.commit()
    return {name: getattr(row, name) for name in QUOTA_FIELDS}


def show(session: Session, settings: Settings, user_name: str | None = None) -> list[dict[str, Any]]:
    """Every user (or one): own quota values, effective limits and usage now."""
    stmt = select(User.id, User.name).order_by(User.name)
    if user_name is not None:
        stmt = stmt.where(User.name == user_name)
    now = utcnow()
    out = []
    for uid, name in session.execute(stmt).all():
        row = session.get(OwnerQuota, uid)
        limits = limits_of(row, settings)
        active = session.execute(active_stmt(uid)).all()
        attempts = session.execute(attempts_stmt(uid, now - timedelta(hours=limits.period_hours))).all()
        out.append({"user": name, "own": {f: getattr(row, f) if row else None for f in QUOTA_FIELDS},
                    "limits": asdict(limits), "usage": asdict(usage_of(active, attempts, limits, now))})  # fmt: skip
    return out
