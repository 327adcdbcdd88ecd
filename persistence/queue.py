"""The broker half of the shared layer: one Celery configuration for publisher and worker.

The API publishes and the worker consumes with the *same* settings, so the transport options
(notably ``visibility_timeout``, read by both sides, celery #9339) cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from persistence.settings import Settings

RUN_JOB_TASK = "ssql.run_job"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options; the filesystem transport gets its folders under SSQL_HOME."""
    url = settings.resolved_broker_url()
    opts: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if url.startswith("filesystem://"):
        folder = settings.broker_dir()
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        opts.update(
            data_folder_in=str(folder / "queue"),
            data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"),
            # exchange tables; kombu's default is ./control in the working directory
            control_folder=str(folder / "control"),
            store_processed=False,
            polling_interval=0.5,
        )
    elif url.startswith("sqla+"):
        opts["polling_interval"] = 0.5
    return opts


def make_celery(settings: Settings) -> Celery:
    """Celery app: late acks, prefetch 1, JSON only, results kept in our tables (not Celery's)."""
    url = settings.resolved_broker_url()
    app = Celery("ssql", broker=url, set_as_current=False)
    opts = transport_options(settings)
    serverless = url.startswith(("filesystem://", "sqla+", "memory://"))
    app.conf.update(
        # visibility_timeout in all three places Celery/kombu read it (celery #7651, #9264)
        broker_transport_options=opts,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_default_queue=settings.queue,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue}},
        # a claimed job's life follows its database lease, not the broker connection (decision 010)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        # Remote control needs a fanout exchange that serverless transports do not offer reliably.
        worker_enable_remote_control=not serverless,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_heartbeat=0 if serverless else 120,
    )
    return app


def publish_job(app: Celery, job_id: str, queue: str) -> None:
    """Send the run message; the job id is the task id so duplicates are recognisable."""
    app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue)
