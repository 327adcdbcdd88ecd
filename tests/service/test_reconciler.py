"""The database is the source of truth for the queue: a job committed but never published (the
broker was down at submit time) is published by the worker's reconciler and runs."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy import select

from api.specs import pretrain_spec
from persistence.db import utcnow
from persistence.models import Job, User
from tests.service.conftest import TINY, wait_for


def test_unpublished_queued_job_is_published_and_runs(client: httpx.Client, settings, sessions, live_worker) -> None:  # type: ignore[no-untyped-def]
    job_id = str(uuid.uuid4())
    with sessions() as s:
        owner = s.scalar(select(User.id).where(User.name == "alice"))
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="queued",
                  spec=pretrain_spec({**TINY, "epochs": 1}, settings), attempts=0, max_attempts=3,
                  cancel_requested=False, created_at=now, updated_at=now, published_at=None))  # fmt: skip
        s.commit()
    job = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job


def _insert(sessions, settings, status: str, attempts: int, lease_age_s: float) -> str:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    job_id = str(uuid.uuid4())
    with sessions() as s:
        owner = s.scalar(select(User.id).where(User.name == "alice"))
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status=status,
                  spec=pretrain_spec({**TINY, "epochs": 1}, settings), attempts=attempts, max_attempts=3,
                  cancel_requested=False, created_at=now, updated_at=now, published_at=now,
                  lease_until=now - timedelta(seconds=lease_age_s), heartbeat_at=now - timedelta(seconds=lease_age_s)))  # fmt: skip
        s.commit()
    return job_id


def test_reaper_requeues_expired_lease_and_fails_exhausted_job(client: httpx.Client, settings, sessions, live_worker) -> None:  # type: ignore[no-untyped-def]
    """A 'running' row whose worker vanished: retried while attempts remain, else failed with a reason."""
    retried = _insert(sessions, settings, "running", attempts=1, lease_age_s=30)
    exhausted = _insert(sessions, settings, "running", attempts=3, lease_age_s=30)
    failed = wait_for(client, exhausted, lambda j: j["status"] != "running", timeout=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost", failed
    assert "attempts" in failed["error"]["message"]
    done = wait_for(client, retried, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
