"""A worker killed with SIGKILL mid-run: no orphan training, the job resumes from its checkpoint
on the next attempt and succeeds, and two attempts never run at the same time."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import httpx
from sqlalchemy import select

from persistence.db import as_utc
from persistence.models import JobAttempt
from tests.service.conftest import TINY, pid_alive, wait_for


def test_kill_9_worker_mid_run_resumes_and_succeeds(client: httpx.Client, live_worker, sessions, settings) -> None:  # type: ignore[no-untyped-def]
    stack = live_worker
    job = client.post("/v1/jobs", json={**TINY, "epochs": 60}).json()
    # past at least one checkpoint (every 4 steps), well before the end (240 steps)
    wait_for(client, job["id"], lambda j: j["status"] == "running" and 40 <= (j["progress"].get("step") or 0), poll=0.05)
    with sessions() as s:
        first = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job["id"])).one()
    assert first.pid and pid_alive(first.pid)
    step_at_kill = client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"]
    assert step_at_kill < 200

    stack.kill_worker()
    deadline = time.monotonic() + 5
    while pid_alive(first.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(first.pid), "the training process outlived its killed worker"
    first_dead_at = datetime.now(timezone.utc)

    stack.start_worker()
    done = wait_for(client, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["summary"]["steps"] == 240
    # the killed attempt's folder went with the claim that superseded it (decisions 010, 014)
    lost = settings.resolved_artifacts_dir() / "jobs" / job["id"] / "attempts" / "1"
    assert not lost.exists(), sorted(lost.rglob("*"))

    with sessions() as s:
        attempts = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job["id"]).order_by(JobAttempt.attempt)).all()
    assert [a.attempt for a in attempts] == [1, 2]
    second = attempts[1]
    assert as_utc(second.started_at) > first_dead_at, "attempt 2 started while attempt 1 was still alive"
    assert second.resumed_from and second.resumed_from.endswith("last.pt")
    assert second.outcome == "succeeded"
    # resumed, not restarted: the second attempt's first progress report is past the kill point
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics", params={"limit": 10000}).json()["items"]
    first_of_second = min(m["step"] for m in metrics if m["attempt"] == 2)
    assert first_of_second > 4, metrics[:3]
