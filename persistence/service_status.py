"""What the service itself is doing, read at request time for ``GET /v1/status`` and ``/metrics``:
jobs by state, queue depth (in the database and in the broker), workers seen, running attempts,
attempt outcomes and recent failures. Every figure comes from the database (or the broker) when
asked, so it is the same whichever API process answers."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.db import utcnow
from persistence.models import Job, JobAttempt, Worker
from persistence.settings import Settings
from persistence.workers import SHOWN_FOR

#: attempt outcomes that are failures (the job may have been retried)
FAILED_OUTCOMES = ("failed", "lost", "lease_lost")

#: kombu's Redis transport keeps one list per priority step: queue + sep + step (step 0: the name)
_REDIS_SEP, _REDIS_PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)


async def jobs_by_state(conn: AsyncConnection) -> list[RowMapping]:
    """(owner_id, status, kind, n) for every combination present."""
    stmt = select(Job.owner_id, Job.status, Job.kind, func.count().label("n")).group_by(Job.owner_id, Job.status, Job.kind)
    return list((await conn.execute(stmt)).mappings().all())


async def workers_seen(conn: AsyncConnection, now: datetime | None = None) -> list[RowMapping]:
    """Workers that reported within :data:`persistence.workers.SHOWN_FOR`, newest report first."""
    since = (now or utcnow()) - SHOWN_FOR
    stmt = select(Worker).where(Worker.heartbeat_at >= since).order_by(Worker.heartbeat_at.desc(), Worker.name)
    return list((await conn.execute(stmt)).mappings().all())


async def running_attempts(conn: AsyncConnection) -> list[RowMapping]:
    """The open attempts of running jobs, oldest first."""
    stmt = (
        select(Job.id.label("job_id"), Job.owner_id, Job.kind, Job.name, Job.progress, Job.heartbeat_at,
               JobAttempt.attempt, JobAttempt.worker, JobAttempt.started_at)
        .join(JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.attempt == Job.claims))
        .where(Job.status == "running", JobAttempt.ended_at.is_(None))
        .order_by(JobAttempt.started_at, Job.id)
    )
    return list((await conn.execute(stmt)).mappings().all())


async def recent_failures(conn: AsyncConnection, hours: float, owner_id: int, limit: int) -> tuple[list[RowMapping], int]:
    """The owner's attempts that ended in a failure in the last ``hours`` (newest first, at most
    ``limit``) with their job's error, and how many such attempts all other owners had."""
    since = utcnow() - timedelta(hours=hours)
    failed = and_(JobAttempt.outcome.in_(FAILED_OUTCOMES), JobAttempt.ended_at >= since)
    stmt = (
        select(Job.id.label("job_id"), Job.kind, Job.name, Job.status, Job.error, JobAttempt.attempt,
               JobAttempt.worker, JobAttempt.outcome, JobAttempt.started_at, JobAttempt.ended_at)
        .join(Job, Job.id == JobAttempt.job_id)
        .where(failed, Job.owner_id == owner_id)
        .order_by(JobAttempt.ended_at.desc(), JobAttempt.id.desc())
        .limit(limit)
    )
    mine = list((await conn.execute(stmt)).mappings().all())
    others = (await conn.execute(select(func.count()).select_from(JobAttempt).join(Job, Job.id == JobAttempt.job_id)
                                 .where(failed, Job.owner_id != owner_id))).scalar_one()
    return mine, int(others)


async def attempt_outcomes(conn: AsyncConnection) -> dict[str, int]:
    """outcome -> attempts that ended with it (all time; ``running`` for open ones)."""
    stmt = select(JobAttempt.outcome, func.count()).group_by(JobAttempt.outcome)
    return {(outcome or "running"): int(n) for outcome, n in (await conn.execute(stmt)).all()}


async def broker_depth(settings: Settings, queues: list[str]) -> dict[str, int | None]:
    """Messages waiting in the broker per queue (None: this transport cannot be read). Messages
    are wake-ups (decision 019): the database's queued jobs are the queue's true depth."""
    url = settings.resolved_broker_url()
    if url.startswith(("redis://", "rediss://")):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            out: dict[str, int | None] = {}
            for q in queues:
                names = [q if step == 0 else f"{q}{_REDIS_SEP}{step}" for step in _REDIS_PRIORITY_STEPS]
                async with client.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.llen(name)
                    out[q] = sum(int(n) for n in await pipe.execute())
            return out
        except (OSError, aioredis.RedisError):
            return dict.fromkeys(queues)
        finally:
            await client.aclose()
    if url.startswith("filesystem://"):
        folder = settings.broker_dir() / "queue"
        names = await asyncio.to_thread(lambda: os.listdir(folder) if folder.is_dir() else [])
        return {q: sum(1 for n in names if n.partition(".")[2] == f"{q}.msg") for q in queues}
    return dict.fromkeys(queues)
