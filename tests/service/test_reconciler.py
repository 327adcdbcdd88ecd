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
