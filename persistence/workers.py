"""Workers seen: each Celery worker reports itself every few seconds (``workers`` table), so the
status page and ``/metrics`` can show host, device, current jobs and last heartbeat without
asking the broker (Celery's remote control is a broadcast with a timeout, and absent on the
embedded filesystem transport)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from persistence.db import as_utc, utcnow
from persistence.models import Worker
from persistence.settings import Settings

#: a worker whose last report is older than this many report periods (and 15 s) is "lost"
LOST_AFTER_PERIODS = 3
#: workers that last reported longer ago than this are no longer shown
SHOWN_FOR = timedelta(hours=24)


def report_seconds(settings: Settings) -> float:
    """How often a worker reports (its job heartbeat period, at least a second)."""
    return max(1.0, float(settings.heartbeat_seconds))


def lost_after(settings: Settings) -> timedelta:
    return timedelta(seconds=max(LOST_AFTER_PERIODS * report_seconds(settings), 15.0))


def worker_state(stopped_at: datetime | None, heartbeat_at: datetime, settings: Settings, now: datetime | None = None) -> str:
    """``up`` (reporting), ``stopped`` (a clean stop) or ``lost`` (its reports stopped)."""
    if stopped_at is not None:
        return "stopped"
    beat = as_utc(heartbeat_at)
    assert beat is not None
    return "up" if (now or utcnow()) - beat <= lost_after(settings) else "lost"


def report(session: Session, *, name: str, host: str, pid: int, queues: list[str], device: str | None,
           concurrency: int, processes: list[str], started_at: datetime) -> None:
    """Insert or refresh the worker's row (a restarted worker of the same name takes it over)."""
    now = utcnow()
    values = {"host": host[:200], "pid": pid, "queues": queues, "device": (device or "")[:200] or None,
              "concurrency": concurrency, "processes": processes, "started_at": started_at,
              "heartbeat_at": now, "stopped_at": None}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(Worker).values(name=name[:200], **values)
    session.execute(stmt.on_conflict_do_update(index_elements=[Worker.name], set_=values))
    session.commit()


def mark_stopped(session: Session, name: str) -> None:
    """A clean stop: the worker is shown as stopped, not lost."""
    now = utcnow()
    session.execute(update(Worker).where(Worker.name == name[:200]).values(stopped_at=now, heartbeat_at=now, processes=[]))
    session.commit()
