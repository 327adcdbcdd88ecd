"""The Celery application of the worker: ``celery -A worker.celery_app worker -Q gpu``.

One task, ``ssql.run_job(job_id)``: claim the job row (lease), supervise the training
subprocess, record the outcome. The worker's main process also runs the reaper/reconciler.
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_ready
from sqlalchemy.orm import Session, sessionmaker

from persistence import job_store
from persistence.db import make_engine, make_sessionmaker
from persistence.queue import RUN_JOB_TASK, make_celery, publish_job
from persistence.settings import get_settings
from worker.reconciler import start_reconciler_thread
from worker.supervisor import supervise, worker_name

log = logging.getLogger("ssql.worker")

settings = get_settings()
app = make_celery(settings)
_sessions: tuple[int, sessionmaker[Session]] | None = None


def sessions() -> sessionmaker[Session]:
    """A session factory owned by this process (engines must not cross a fork)."""
    global _sessions
    if _sessions is None or _sessions[0] != os.getpid():
        _sessions = (os.getpid(), make_sessionmaker(make_engine(settings)))
    return _sessions[1]


def publish(job_id: str) -> None:
    publish_job(app, job_id, settings.queue)


@worker_process_init.connect
def _reset_after_fork(**_kwargs: object) -> None:
    global _sessions
    _sessions = None


@worker_ready.connect
def _start_reconciler(**_kwargs: object) -> None:
    start_reconciler_thread(settings, sessions(), publish)


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim and run one job; a duplicate or stale delivery finds no claimable row and returns."""
    Sessions = sessions()
    with Sessions() as s:
        claimed = job_store.claim(s, job_id, worker_name(), settings.lease_seconds)
    if claimed is None:
        log.info("job %s: not claimable (owned elsewhere, finished or out of attempts); dropping delivery", job_id)
        return "skipped"
    return supervise(settings, Sessions, claimed, publish)
