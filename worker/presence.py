"""The worker's presence: a thread of the worker's main process that writes its row of the
``workers`` table (host, device, queues, pool processes, heartbeat) every
:func:`persistence.workers.report_seconds`, and marks it stopped at a clean stop. The status
page and ``/metrics`` read that table (``GET /v1/status``; decision 015).

The device is described without touching CUDA in this process (the main process forks the pool:
a CUDA context made here would break every child): from ``nvidia-smi`` when the worker may use
a GPU, else the CPU's model name.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
from typing import Any

from billiard.process import active_children
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.orm import Session, sessionmaker

from persistence import workers
from persistence.db import utcnow
from persistence.settings import Settings

log = logging.getLogger("ssql.presence")

_stop = threading.Event()
_started: dict[str, Any] = {}


def describe_device(settings: Settings) -> str:
    """``NVIDIA H100 80GB HBM3`` (``2x ...`` for several), or ``cpu: <model>``."""
    if settings.device != "cpu":
        names = _visible_gpus()
        if names:
            return f"{len(names)}x {names[0]}" if len(set(names)) == 1 and len(names) > 1 else ", ".join(names)
    from ssql_core.runtime import cpu_name

    return f"cpu: {cpu_name()}"


def _visible_gpus() -> list[str]:
    """GPU names from ``nvidia-smi``, restricted to ``CUDA_VISIBLE_DEVICES`` when it lists indices."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = {}
    for line in out.splitlines():
        index, _, name = line.partition(",")
        if name.strip():
            gpus[index.strip()] = name.strip()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus.values())
    return [gpus[i.strip()] for i in visible.split(",") if i.strip() in gpus]


def pool_processes() -> list[str]:
    """The names the pool processes run jobs under (``jobs.worker``: see supervisor.worker_name)."""
    host = socket.gethostname()
    return sorted(f"{host}:{child.pid}" for child in active_children() if child.pid)


def start(settings: Settings, sessions: sessionmaker[Session], name: str, queues: list[str], concurrency: int) -> threading.Thread:
    """Report now and then every period, in a daemon thread, until :func:`stop`."""
    started_at, host, device = utcnow(), socket.gethostname(), describe_device(settings)
    _started.update(name=name, sessions=sessions)

    def beat() -> None:
        with sessions() as s:
            workers.report(s, name=name, host=host, pid=os.getpid(), queues=queues, device=device,
                           concurrency=concurrency, processes=pool_processes(), started_at=started_at)

    def loop() -> None:
        while not _stop.is_set():
            try:
                beat()
            except Exception:  # noqa: BLE001 - a database blip must not end the reports
                log.warning("worker %s: could not report its presence", name, exc_info=True)
            _stop.wait(workers.report_seconds(settings))

    _stop.clear()
    thread = threading.Thread(target=loop, name="ssql-presence", daemon=True)
    thread.start()
    return thread


def stop() -> None:
    """A clean stop: no more reports, the row says stopped."""
    _stop.set()
    if "name" in _started:
        try:
            with _started["sessions"]() as s:
                workers.mark_stopped(s, _started["name"])
        except Exception:  # noqa: BLE001 - shown as lost instead
            log.warning("worker %s: could not record its stop", _started["name"], exc_info=True)


def connect(settings: Settings, sessions: Any) -> None:
    """Hook the presence to the worker's lifecycle signals (called once by worker.celery_app)."""

    @worker_ready.connect(weak=False)
    def _on_ready(sender: Any = None, **_kwargs: object) -> None:
        name = str(getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}")
        try:
            queues = sorted(q.name for q in sender.task_consumer.queues)
        except AttributeError:
            queues = [settings.queue]
        concurrency = int(getattr(getattr(sender, "pool", None), "limit", None) or 1)
        start(settings, sessions(), name, queues, concurrency)

    @worker_shutdown.connect(weak=False)
    def _on_shutdown(**_kwargs: object) -> None:
        stop()
