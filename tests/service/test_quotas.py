"""Issue 19, item 1: quotas per owner (docs/decisions/014). Real API, Postgres, Redis and Celery
workers; quotas set with the real ``ssql owners set-quota``."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import select

from persistence.db import as_utc, utcnow
from persistence.keys import create_key
from persistence.models import Job, JobAttempt, User
from persistence.queue import make_celery
from persistence.quotas import Limits, budget_frees_at, run_hold, usage_of
from ssql_cli.stack import worker_command
from tests.service.conftest import TINY, wait_for

pytestmark = pytest.mark.service
TERMINAL = ("succeeded", "failed", "cancelled")


def _owner(sessions, prefix: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    with sessions() as s:
        return name, create_key(s, name)


def _ssql(service_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssql_cli.main", *args], env=service_env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _jobs_of(sessions, name: str) -> list[Job]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return list(s.scalars(select(Job).join(User, User.id == Job.owner_id).where(User.name == name)))


def test_active_jobs_quota_refuses_with_429_and_queues_nothing(stack, sessions, service_env) -> None:  # type: ignore[no-untyped-def]
    name, key = _owner(sessions, "quota-active")
    done = _ssql(service_env, "owners", "set-quota", name, "--max-active-jobs", "2")
    assert done.returncode == 0, done.stderr
    assert "max_active_jobs=2" in done.stdout
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        ids = []
        for _ in range(2):
            r = c.post("/v1/jobs", json={**TINY, "epochs": 400})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        try:
            refused = c.post("/v1/jobs", json={**TINY, "epochs": 1})
            assert refused.status_code == 429, refused.text
            body = refused.json()
            assert (body["code"], body["quota"], body["limit"], body["usage"]) == ("quota_exceeded", "max_active_jobs", 2, 2)
            assert "max_active_jobs" in body["detail"] and "frees when" in body["detail"]
            assert int(refused.headers["retry-after"]) >= 1
            assert len(_jobs_of(sessions, name)) == 2  # nothing queued
            # an export is a job too
            assert c.post(f"/v1/jobs/{ids[0]}/exports", json={"bits": ["4w4a"]}).status_code in (409, 429)
            usage = c.get("/v1/usage").json()
            assert usage["limits"]["max_active_jobs"] == 2 and usage["usage"]["active_jobs"] == 2
            assert usage["can_submit"] is False and usage["refusal"]["quota"] == "max_active_jobs"
            # the CLI says the same
            shown = _ssql(service_env, "owners", "show", name)
            assert shown.returncode == 0 and "2/2" in shown.stdout, shown.stdout
            mine = _ssql({**service_env, "SSQL_URL": stack.url, "SSQL_API_KEY": key}, "usage")
            assert mine.returncode == 0 and "queued + running jobs  2 of 2" in mine.stdout, mine.stdout + mine.stderr
            assert "HTTP 429" in mine.stdout
            cli_submit = _ssql({**service_env, "SSQL_URL": stack.url, "SSQL_API_KEY": key}, "submit", "pretrain",
                               "--set", "epochs=1")  # fmt: skip
            assert cli_submit.returncode != 0 and "429" in cli_submit.stderr and "max_active_jobs" in cli_submit.stderr
            # a slot frees when one ends
            assert c.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 202
            wait_for(c, ids[0], lambda j: j["status"] in TERMINAL, timeout=60)
            again = c.post("/v1/jobs", json={**TINY, "epochs": 400})
            assert again.status_code == 201, again.text
            ids.append(again.json()["id"])
            # back to the server's default (none): no limit
            assert _ssql(service_env, "owners", "set-quota", name, "--max-active-jobs", "default").returncode == 0
            extra = c.post("/v1/jobs", json={**TINY, "epochs": 400})
            assert extra.status_code == 201, extra.text
            ids.append(extra.json()["id"])
        finally:
            for job_id in ids:
                c.post(f"/v1/jobs/{job_id}/cancel")


def test_devices_and_zero_running_quota_are_403_at_submission(stack, sessions, service_env) -> None:  # type: ignore[no-untyped-def]
    name, key = _owner(sessions, "quota-dev")
    assert _ssql(service_env, "owners", "set-quota", name, "--max-devices", "1").returncode == 0
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        r = c.post("/v1/jobs", json={**TINY, "epochs": 1, "devices": 2})
        assert r.status_code == 403, r.text
        assert (r.json()["quota"], r.json()["limit"], r.json()["usage"]) == ("max_devices", 1, 2)
        assert _ssql(service_env, "owners", "set-quota", name, "--max-devices", "unlimited", "--max-running-jobs", "0").returncode == 0
        r = c.post("/v1/jobs", json={**TINY, "epochs": 1})
        assert r.status_code == 403 and r.json()["quota"] == "max_running_jobs", r.text
    assert _jobs_of(sessions, name) == []
    bad = _ssql(service_env, "owners", "set-quota", "nobody-" + uuid.uuid4().hex, "--max-devices", "1")
    assert bad.returncode == 1 and "no user" in bad.stderr
    bad = _ssql(service_env, "owners", "set-quota", name, "--max-devices", "1.5")
    assert bad.returncode == 2 and "whole number" in bad.stderr
    bad = _ssql(service_env, "owners", "set-quota", name, "--max-devices", "lots")
    assert bad.returncode == 2 and "'default' or 'unlimited'" in bad.stderr


def test_device_hour_budget_is_403_with_when_it_frees(stack, sessions, service_env) -> None:  # type: ignore[no-untyped-def]
    name, key = _owner(sessions, "quota-budget")
    assert _ssql(service_env, "owners", "set-quota", name, "--device-hours", "0.1", "--period-hours", "1").returncode == 0
    now = utcnow()
    with sessions() as s:  # 10 device-minutes spent from 50 to 40 minutes ago (two devices for 5 minutes)
        owner = s.scalar(select(User.id).where(User.name == name))
        job_id = str(uuid.uuid4())
        s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="succeeded", spec={"config": {"devices": 2}},
                  attempts=1, max_attempts=3, cancel_requested=False, created_at=now - timedelta(minutes=51),
                  updated_at=now, finished_at=now - timedelta(minutes=45)))  # fmt: skip
        s.add(JobAttempt(job_id=job_id, attempt=1, worker="w:1", started_at=now - timedelta(minutes=50),
                         ended_at=now - timedelta(minutes=45), outcome="succeeded"))  # fmt: skip
        s.commit()
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        r = c.post("/v1/jobs", json={**TINY, "epochs": 1})
        assert r.status_code == 403, r.text
        body = r.json()
        assert body["quota"] == "device_hours" and body["limit"] == 0.1
        assert abs(body["usage"] - 10 / 60) < 1e-3
        # 6 of the 10 device-minutes must leave the window: 3 minutes after the attempt's start does (2 devices)
        frees = datetime.fromisoformat(body["frees_at"])
        expected = now - timedelta(minutes=50) + timedelta(hours=1) + timedelta(minutes=2)
        assert abs((frees - expected).total_seconds()) < 5, (frees, expected)
        assert int(r.headers["retry-after"]) > 60
        u = c.get("/v1/usage").json()
        assert u["can_submit"] is False and u["budget_frees_at"] is not None
    assert [j.id for j in _jobs_of(sessions, name)] == [job_id]


def test_running_jobs_quota_is_enforced_where_a_worker_claims(stack, live_worker, sessions, service_env, settings) -> None:  # type: ignore[no-untyped-def]
    """Two idle workers, one owner allowed one running job: the second job waits queued (a worker
    leaves it, published again when the first ends) and starts only after the first ended."""
    name, key = _owner(sessions, "quota-run")
    assert _ssql(service_env, "owners", "set-quota", name, "--max-running-jobs", "1").returncode == 0
    extra = subprocess.Popen(worker_command(service_env["SSQL_QUEUE"], "quota-extra"), env=service_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        app = make_celery(settings)  # both workers idle and listening before anything is submitted
        deadline = time.monotonic() + 90
        while not any(name.startswith("quota-extra@") for reply in app.control.ping(timeout=1.0) for name in reply):
            assert time.monotonic() < deadline, "the extra worker did not start"
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            first = c.post("/v1/jobs", json={**TINY, "epochs": 10}).json()["id"]
            wait_for(c, first, lambda j: j["status"] != "queued", timeout=90)
            second = c.post("/v1/jobs", json={**TINY, "epochs": 1}).json()["id"]
            # a worker takes the second job's message and leaves the job queued for the quota
            deadline = time.monotonic() + 90
            while True:
                with sessions() as s:
                    row = s.get(Job, second)
                    held = row.status == "queued" and row.published_at is None
                    started = row.status != "queued"
                if held or started:
                    break
                assert time.monotonic() < deadline, "no worker tried the second job"
                time.sleep(0.1)
            assert held, "the second job started while the first ran (the quota allows one running job)"
            for job_id in (first, second):
                job = wait_for(c, job_id, lambda j: j["status"] in TERMINAL, timeout=240)
                assert job["status"] == "succeeded", job
        with sessions() as s:
            a = s.scalars(select(JobAttempt).where(JobAttempt.job_id == first)).all()
            b = s.scalars(select(JobAttempt).where(JobAttempt.job_id == second)).all()
        assert min(as_utc(x.started_at) for x in b) >= max(as_utc(x.ended_at) for x in a)
    finally:
        extra.kill()
        extra.wait()


# -- the arithmetic, by construction ----------------------------------------------------------------------


def _attempt(start_min: float, end_min: float | None, devices: int = 1) -> SimpleNamespace:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return SimpleNamespace(started_at=now + timedelta(minutes=start_min),
                           ended_at=None if end_min is None else now + timedelta(minutes=end_min),
                           kind="pretrain", spec={"config": {"devices": devices}})  # fmt: skip


def test_usage_counts_only_the_window_and_devices() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    limits = Limits(None, None, None, 1.0, period_hours=1.0)
    # in the last hour: nothing of the first, 2 devices x 30 min of the second, 4 x 10 min of the third
    attempts = [_attempt(-90, -70), _attempt(-70, -30, 2), _attempt(-20, -10, 4)]
    assert abs(usage_of([], attempts, limits, now).device_hours - (60 + 40) / 60) < 1e-5
    # the second leaves the window at 2 device-minutes per minute: below 60 device-minutes after 20 minutes
    frees = budget_frees_at(attempts, limits, now)
    assert frees is not None and abs((frees - (now + timedelta(minutes=20))).total_seconds()) <= 1.0
    assert budget_frees_at([_attempt(-10, -5)], limits, now) is None  # 5 device-minutes: not used up
    open_attempt = [_attempt(-120, None)]  # running for 2 hours: the whole window, counted up to now
    assert abs(usage_of([], open_attempt, limits, now).device_hours - 1.0) < 1e-5


def test_run_hold_counts_running_jobs_and_devices() -> None:
    running = [SimpleNamespace(status="running", kind="pretrain", spec={"config": {"devices": 2}}, progress=None)]
    queued = [SimpleNamespace(status="queued", kind="eval", spec={}, progress=None)]
    assert run_hold(running + queued, Limits(None, 1, None, None, 1.0), 1) is not None
    assert run_hold(running + queued, Limits(None, 2, None, None, 1.0), 1) is None
    assert run_hold(running, Limits(None, None, 3, None, 1.0), 1) is None
    assert run_hold(running, Limits(None, None, 3, None, 1.0), 2) is not None
