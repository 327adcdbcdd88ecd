"""The Celery application of the worker: ``celery -A worker.celery_app worker -Q gpu``.

One task, ``ssql.run_job(job_id)``: a wake-up. Claim the job row the fair-share rule picks
(lease; decision 019), supervise the training subprocess, record the outcome. The worker's
main process also runs the reaper/reconciler.

A claimed job does not depend on the broker connection (the database lease decides who runs it,
a redelivered message is dropped by the claim): a Redis restart must not cancel the running task,
and the worker retries the broker for ever instead of exiting. A graceful stop (SIGTERM: warm
shutdown) hands the running job back to the queue at a checkpoint (docs/decisions/010).
"""

from __future__ import annotations

import logging
import os
import signal

from billiard.process import active_children
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)
from celery.worker import state as worker_state
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from persistence import fair_share, quotas
from persistence.db import make_engine, make_sessionmaker
from persistence.models import Job
from persistence.queue import RUN_JOB_TASK, make_celery, publish_job
from persistence.settings import get_settings
from worker import presence, supervisor
from worker.reconciler import start_reconciler_thread
from worker.supervisor import supervise, worker_name

log = logging.getLogger("ssql.worker")

settings = get_settings()
app = make_celery(settings)
app.conf.update(
    # With late acks Celery would terminate a running task when the broker connection drops (its
    # message can no longer be acked on the new connection and will be redelivered). Our claim
    # makes a redelivery harmless, so the training keeps running through a broker blip.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # never give up on the broker (default: 100 retries, then the worker exits, killing the job)
    broker_connection_max_retries=None,
    broker_connection_retry=True,
)
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


_default_sigterm: list[object] = []


def _on_sigterm(_sig: int, _frame: object) -> None:
    supervisor.handback_requested.set()


@task_prerun.connect
def _hand_back_on_sigterm(**_kwargs: object) -> None:
    """While a task runs, SIGTERM to its pool process (from the main process at a warm shutdown,
    or to the worker's whole process group) hands the job back instead of killing the process.
    Installed per task: billiard resets the pool process's signals after ``worker_process_init``."""
    supervisor.handback_requested.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is not _on_sigterm:
        _default_sigterm[:] = [previous]


@task_postrun.connect
def _restore_sigterm(**_kwargs: object) -> None:
    if _default_sigterm:
        signal.signal(signal.SIGTERM, _default_sigterm[0])  # type: ignore[arg-type]


@worker_shutting_down.connect
def _hand_back_running_jobs(how: str = "", **_kwargs: object) -> None:
    """Warm shutdown (SIGTERM to the main process, e.g. ``docker compose stop``): Celery waits for
    the running task; tell its pool process to stop the runner at a checkpoint and hand back."""
    if how != "Warm":
        return
    # only the pool processes running a task: an idle one would die of the SIGTERM and Celery
    # would log an ERROR ("exited with signal 15") at every clean stop. A task handed to the
    # pool but not yet accepted has no pid yet: then every pool process is told, as before.
    busy = {request.worker_pid for request in list(worker_state.active_requests)}
    unplaced = any(r not in worker_state.active_requests for r in list(worker_state.reserved_requests))
    for child in active_children():
        if not unplaced and child.pid not in busy:
            continue
        try:
            os.kill(child.pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):
            pass


@worker_ready.connect
def _start_reconciler(**_kwargs: object) -> None:
    start_reconciler_thread(settings, sessions(), publish)


presence.connect(settings, sessions)  # the workers table: what the status page and /metrics show


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """A wake-up: claim and run the job the fair-share rule picks now (decision 019), which need
    not be ``job_id``; the message of the job taken stays in the broker and wakes a worker for the
    next one. ``job_id`` left queued by its owner's quota is marked unpublished (decision 014)."""
    Sessions = sessions()
    with Sessions() as s:
        decision = fair_share.claim_next(s, settings, worker_name(), settings.lease_seconds)
        claimed = decision.claimed
        if claimed is None or claimed.id != job_id:
            mine = s.execute(select(Job.owner_id, Job.kind, Job.spec).where(Job.id == job_id, Job.status == "queued")).first()
            if mine is not None and (mine.owner_id in decision.held_owners
                                     or quotas.start_hold(s, mine.owner_id, mine.kind, mine.spec, settings)):
                quotas.mark_held(s, job_id)
                log.info("job %s: left queued by its owner's quota; republished when one of theirs ends", job_id)
            s.commit()
    if claimed is None:
        log.info("wake-up for job %s: nothing claimable now (running, finished, or held by a quota)", job_id)
        return "idle"
    if claimed.id != job_id:
        log.info("wake-up for job %s: the fair share picks job %s", job_id, claimed.id)
    return supervise(settings, Sessions, claimed, publish)
