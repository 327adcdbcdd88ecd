"""Periodic repair of the queue from the database, which is the source of truth.

* reaper: a running job whose lease expired (worker killed, host lost) is requeued while it has
  attempts left, else failed with an explanation;
* reconciler: a queued job never published (publish failed after the commit) or published long
  ago (broker lost the message) is published again. Duplicates are harmless: the claim drops them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from persistence import job_store
from persistence.settings import Settings

log = logging.getLogger("ssql.reconciler")


def reconcile_once(settings: Settings, Sessions: sessionmaker[Session], publish: Callable[[str], None]) -> dict[str, list[str]]:
    with Sessions() as s:
        requeued, failed = job_store.reap_expired(s)
        stale = job_store.stale_queued(s, settings.stale_queued_seconds)
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

    def loop() -> None:
        while not stop.is_set():
            try:
                reconcile_once(settings, Sessions, publish)
            except Exception:  # noqa: BLE001 - database briefly unreachable: keep the thread alive
                log.exception("reconciler round failed")
            stop.wait(settings.reconcile_seconds)

    threading.Thread(target=loop, name="ssql-reconciler", daemon=True).start()
    return stop
