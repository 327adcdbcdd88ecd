"""Periodic repair of the queue from the database, which is the source of truth.

* reaper: a running job whose lease expired (worker killed, host lost) is requeued while it has
  attempts left, else failed with an explanation;
* reconciler: a queued job never published (publish failed after the commit, or requeued by the
  reaper: ``published_at`` is null) is published; one published longer than
  ``SSQL_STALE_QUEUED_SECONDS`` ago is published again only when its message is not waiting in
  the broker queue (really lost) and no spare message covers it, so a job that merely waits
  behind others gets no duplicates. Messages are wake-ups: a worker claims the job the fair share
  picks (decision 019), so the message of a job started on another's wake-up covers one lost.
  When the broker's queue cannot be inspected (another transport), the old rule applies: a
  duplicate is harmless, the claim drops it (docs/decisions/011).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from persistence import job_store, quotas
from persistence.models import Job
from persistence.settings import Settings
from worker.supervisor import remove_attempt_folders

log = logging.getLogger("ssql.reconciler")

#: kombu's Redis transport: one list per priority step, named queue + sep + step (step 0: the name)
_REDIS_SEP, _REDIS_PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)
#: messages read per LRANGE call
_SCAN_CHUNK = 1000


def _message_id(raw: bytes | str) -> str | None:
    """The task id (= job id) of a kombu message as stored by the broker."""
    try:
        msg = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(msg, dict):
        return None
    headers, props = msg.get("headers") or {}, msg.get("properties") or {}
    task_id = headers.get("id") or props.get("correlation_id")
    return task_id if isinstance(task_id, str) else None


class BrokerQueue:
    """What waits in the broker queue of ``settings.queue``: the job ids of its ready messages.

    Redis (kombu lists, every priority step) and kombu's filesystem transport (embedded mode)
    are read; for any other transport :meth:`job_ids` returns None (unknown). Messages a worker
    has already received (kombu's ``unacked`` hash) do not count: a worker that died holding one
    would otherwise strand its job until the visibility timeout (7 days)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.resolved_broker_url()
        self._redis: Any = None

    def job_ids(self) -> set[str] | None:
        try:
            if self.url.startswith(("redis://", "rediss://")):
                return self._redis_ids()
            if self.url.startswith("filesystem://"):
                return self._filesystem_ids()
        except Exception:  # noqa: BLE001 - broker unreadable: behave as if nothing is known
            log.warning("could not inspect the broker queue %r", self.settings.queue, exc_info=True)
            self._redis = None
        return None

    def _redis_ids(self) -> set[str]:
        import redis

        if self._redis is None:
            self._redis = redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5)
        ids: set[str] = set()
        for step in _REDIS_PRIORITY_STEPS:
            name = self.settings.queue if step == 0 else f"{self.settings.queue}{_REDIS_SEP}{step}"
            start = 0
            while True:
                chunk = self._redis.lrange(name, start, start + _SCAN_CHUNK - 1)
                ids.update(i for i in map(_message_id, chunk) if i)
                if len(chunk) < _SCAN_CHUNK:
                    break
                start += _SCAN_CHUNK
        return ids

    def _filesystem_ids(self) -> set[str]:
        folder = self.settings.broker_dir() / "queue"
        suffix = f".{self.settings.queue}.msg"
        ids: set[str] = set()
        for path in folder.iterdir():
            if path.name.endswith(suffix):
                try:
                    job_id = _message_id(path.read_bytes())
                except OSError:  # consumed meanwhile
                    continue
                if job_id:
                    ids.add(job_id)
        return ids


def _to_publish(session: Session, candidates: list[str], broker: BrokerQueue | None) -> list[str]:
    """Of the stale queued jobs, those to publish: never published (``published_at`` null), and
    of the ones published long ago whose message is not in the broker queue, as many as the
    waiting messages of jobs no longer queued do not cover. Messages are wake-ups (decision 019):
    a worker that takes one claims the job the fair share picks, so the message of a job started
    on another job's wake-up still waits and will start one of those."""
    if not candidates or broker is None:
        return candidates
    never = set(session.scalars(select(Job.id).where(Job.id.in_(candidates), Job.published_at.is_(None))))
    if len(never) == len(candidates):
        return candidates
    waiting = broker.job_ids()
    if waiting is None:
        return candidates
    missing = [j for j in candidates if j not in never and j not in waiting]
    spare = _spare_wakeups(session, waiting) if missing else 0
    return [j for j in candidates if j in never] + missing[spare:]


def _spare_wakeups(session: Session, waiting: set[str]) -> int:
    """Waiting messages whose job is not queued (it was started on another message, or ended):
    each will wake a worker that claims some queued job."""
    ids = sorted(waiting)
    queued = 0
    for i in range(0, len(ids), _SCAN_CHUNK):
        chunk = ids[i:i + _SCAN_CHUNK]
        queued += session.scalar(select(func.count()).select_from(Job).where(Job.id.in_(chunk), Job.status == "queued")) or 0
    return len(ids) - queued


def reconcile_once(
    settings: Settings,
    Sessions: sessionmaker[Session],
    publish: Callable[[str], None],
    broker: BrokerQueue | None = None,
) -> dict[str, list[str]]:
    """One round of reaping and republishing; ``broker`` (default: a view of ``settings``' broker)
    tells which messages are still waiting."""
    broker = broker if broker is not None else BrokerQueue(settings)
    with Sessions() as s:
        requeued, failed = job_store.reap_expired(s)
        # ended jobs whose lost attempts left folders (a job failed here, or requeued then
        # cancelled): no attempt follows a terminal status, so the folders go (decisions 010, 014)
        ended = job_store.recently_finished(s, max(60.0, 3 * settings.reconcile_seconds))
    for job_id in dict.fromkeys([*failed, *ended]):
        remove_attempt_folders(settings, job_id)
    with Sessions() as s:
        stale = [j for j in job_store.stale_queued(s, settings.stale_queued_seconds) if j not in set(requeued)]
        if stale:  # jobs a worker left queued for their owner's quota wait until it has room
            held = quotas.held_by_quota(s, stale, settings)
            stale = [j for j in stale if j not in held]
        stale = _to_publish(s, stale, broker)
    published = []
    for job_id in dict.fromkeys(requeued + stale):
        try:
            publish(job_id)
            published.append(job_id)
        except Exception:  # noqa: BLE001 - broker down: the next round tries again
            log.exception("could not publish job %s", job_id)
            break
    with Sessions() as s:
        job_store.mark_published(s, published)
    if requeued or failed or published:
        log.info("reconciler: requeued %s, failed %s, published %s", requeued, failed, published)
    return {"requeued": requeued, "failed": failed, "published": published}


def start_reconciler_thread(
    settings: Settings, Sessions: sessionmaker[Session], publish: Callable[[str], None]
) -> threading.Event:
    """Run :func:`reconcile_once` every ``reconcile_seconds`` in a daemon thread; set the event to stop."""
    stop = threading.Event()
    broker = BrokerQueue(settings)

    def loop() -> None:
        while not stop.is_set():
            try:
                reconcile_once(settings, Sessions, publish, broker)
            except Exception:  # noqa: BLE001 - database briefly unreachable: keep the thread alive
                log.exception("reconciler round failed")
            stop.wait(settings.reconcile_seconds)

    threading.Thread(target=loop, name="ssql-reconciler", daemon=True).start()
    return stop
