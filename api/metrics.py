"""Prometheus metrics of the API (``GET /metrics``, decision 015), by ``prometheus_client``.

* Per request, counted in the process that answers it: ``ssql_http_requests_total`` and the
  ``ssql_http_request_duration_seconds`` histogram, labelled by method, the *route template*
  (``/v1/jobs/{job_id}``, never the raw path: job ids would make a series each) and status. A
  streaming answer (``/events``, ``/logs?follow``) counts its whole stream.
* Read from the database (and the broker) at scrape time, so the same in every process: jobs by
  state and kind, queue depth, running attempts, attempt outcomes, workers' heartbeats.

Several API processes (``uvicorn --workers N``, as docker-compose runs it): request counters live
in each process, so set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder shared by the processes
(emptied before they start); a scrape of any of them then sums every process's files
(prometheus_client's multiprocess mode). Without it a scrape shows only the process that answered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.head import _MARK as HEAD_MARK

disable_created_metrics()  # no *_created series: a scrape carries what dashboards use
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUESTS = Counter("ssql_http_requests", "HTTP requests answered, by method, route template and status",
                   ["method", "route", "status"])
LATENCY = Histogram("ssql_http_request_duration_seconds", "Time to answer an HTTP request (a stream: its whole length)",
                    ["method", "route"], buckets=BUCKETS)
#: the route label of a request no route matched (a 404): raw paths would be unbounded
UNMATCHED = "<unmatched>"


def route_template(scope: Scope) -> str:
    """The template of the route that served the request (Starlette records it in the scope when
    it matches one; a Mount's is its prefix, e.g. ``/static``)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class RequestMetrics:
    """Pure ASGI middleware (no buffering of streamed answers) counting and timing requests.
    Installed inside :class:`api.head.HeadAsGet`, so a HEAD arrives as its marked GET copy
    (whose scope receives the route), and outside every other middleware (413s count)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = route_template(scope)
            method = "HEAD" if scope.get(HEAD_MARK) else scope.get("method", "GET")
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)


class Snapshot(Collector):
    """Families computed before the scrape (from the database, asynchronously) and served as is."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def service_families(snapshot: dict[str, Any]) -> list[Metric]:
    """The database-derived families of one scrape (``snapshot`` from api.routes.service)."""
    jobs = GaugeMetricFamily("ssql_jobs", "Jobs by state and kind (all owners)", labels=["state", "kind"])
    for (state, kind), n in sorted(snapshot["jobs"].items()):
        jobs.add_metric([state, kind], n)
    depth = GaugeMetricFamily("ssql_queue_depth", "Queued jobs per queue (the database's count)", labels=["queue"])
    broker = GaugeMetricFamily("ssql_queue_broker_messages", "Messages waiting in the broker per queue", labels=["queue"])
    for q in snapshot["queues"]:
        depth.add_metric([q["name"]], q["queued"])
        if q["broker_messages"] is not None:
            broker.add_metric([q["name"]], q["broker_messages"])
    running = GaugeMetricFamily("ssql_attempts_running", "Attempts running now")
    running.add_metric([], snapshot["running"])
    outcomes = CounterMetricFamily("ssql_job_attempts_ended", "Attempts ended, by outcome", labels=["outcome"])
    for outcome, n in sorted(snapshot["outcomes"].items()):
        if outcome != "running":
            outcomes.add_metric([outcome], n)
    beat = GaugeMetricFamily("ssql_worker_last_heartbeat_timestamp_seconds", "A worker's last report (Unix time)",
                             labels=["worker", "host", "device"])
    up = GaugeMetricFamily("ssql_worker_up", "1 while a worker reports, 0 once stopped or lost", labels=["worker"])
    busy = GaugeMetricFamily("ssql_worker_running_jobs", "Jobs a worker is running", labels=["worker"])
    for w in snapshot["workers"]:
        beat.add_metric([w["name"], w["host"], w["device"] or ""], w["heartbeat_ts"])
        up.add_metric([w["name"]], 1.0 if w["state"] == "up" else 0.0)
        busy.add_metric([w["name"]], w["running_jobs"])
    return [jobs, depth, broker, running, outcomes, beat, up, busy]


def exposition(families: list[Metric]) -> bytes:
    """The Prometheus text format: this process's (in multiprocess mode: every process's) request
    metrics, then the scrape's database-derived families (distinct names: the two concatenate)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        requests = CollectorRegistry()
        MultiProcessCollector(requests)
    else:
        requests = REGISTRY  # with the process, platform and GC collectors
    service = CollectorRegistry()
    service.register(Snapshot(families))
    return generate_latest(requests) + generate_latest(service)
