"""Worker lifecycle on the real services (docs/decisions/010): a broker restart mid-job, a stalled
(SIGSTOPped) supervisor, and a graceful worker stop (SIGTERM).

These tests run their own Redis (a throwaway ``redis-server`` on a free port, killed and
restarted here), their own API + worker stack and their own Postgres database: the database
picks the job a free worker starts (decision 019), so a stack on the session's database would
also start this module's jobs (a flake: the SIGSTOP test's second attempt ran on the session's
worker, under another SSQL_HOME, without the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from persistence.db import as_utc, make_engine, make_sessionmaker
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.models import JobAttempt
from persistence.settings import Settings
from ssql_cli.stack import OwnRedis, Stack, free_port, worker_command
from tests.service.conftest import TINY, create_database, pid_alive, wait_for

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    r = OwnRedis(tmp_path_factory.mktemp("own_redis"))
    r.start()
    yield r
    if r.pidfile.exists():
        r.kill()


@pytest.fixture(scope="module")
def lc_db() -> Iterator[str]:
    url, drop = create_database("ssql_lc")
    yield url
    drop()


@pytest.fixture(scope="module")
def lc_env(service_env: dict[str, str], own_redis: OwnRedis, lc_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return dict(
        service_env,
        SSQL_HOME=str(tmp_path_factory.mktemp("lifecycle_home")),
        SSQL_DATABASE_URL=lc_db,
        SSQL_BROKER_URL=own_redis.url,
        SSQL_QUEUE=f"gpu-lc-{uuid.uuid4().hex[:8]}",
        SSQL_HANDBACK_SECONDS="10",
    )


@pytest.fixture(scope="module")
def sessions(lc_env: dict[str, str]):  # type: ignore[no-untyped-def]
    """This module's database (migrated), in place of the session's."""
    settings = Settings(home=Path(lc_env["SSQL_HOME"]), database_url=lc_env["SSQL_DATABASE_URL"])
    upgrade_head(settings)
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def lc_key(sessions) -> str:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return create_key(s, "alice")


@pytest.fixture(scope="module")
def lc_stack(lc_env: dict[str, str], sessions) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = Stack(lc_env, free_port(), log_dir=Path(lc_env["SSQL_HOME"]) / "logs")
    s.start(timeout=90)
    yield s
    s.stop()


@pytest.fixture()
def lc(lc_stack: Stack) -> Stack:
    """The module's stack with a live worker."""
    if lc_stack.worker is None or lc_stack.worker.poll() is not None:
        lc_stack.start_worker()
    return lc_stack


@pytest.fixture(scope="module")
def lc_client(lc_stack: Stack, lc_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lc_stack.url, headers={"Authorization": f"Bearer {lc_key}"}, timeout=30) as c:
        yield c


def _spawn_worker(stack: Stack, name: str) -> subprocess.Popen:
    return stack._spawn(worker_command(stack.env["SSQL_QUEUE"], name), name)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _attempts(sessions, job_id: str) -> list[JobAttempt]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)))


def _wait_attempt(sessions, job_id: str, pred, timeout: float = 60) -> list[JobAttempt]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    rows: list[JobAttempt] = []
    while time.monotonic() < deadline:
        rows = _attempts(sessions, job_id)
        if pred(rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"attempt rows of {job_id}: {[(a.attempt, a.outcome, a.ended_at) for a in rows]}")


def _job_dir(env: dict[str, str], job_id: str) -> Path:
    return Settings(home=Path(env["SSQL_HOME"])).resolved_artifacts_dir() / "jobs" / job_id


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(job: dict) -> int:
    return (job.get("progress") or {}).get("step") or 0


# -- (1) a broker restart does not touch a running job ------------------------------------------

def test_redis_restarts_mid_job_leave_it_running_on_its_first_attempt(lc, lc_client, own_redis, sessions) -> None:  # type: ignore[no-untyped-def]
    # long enough (240 steps) to outlast three blips on an idle machine too
    job = lc_client.post("/v1/jobs", json={**TINY, "epochs": 60}).json()
    wait_for(lc_client, job["id"], lambda j: j["status"] == "running" and _steps(j) >= 8, poll=0.05)
    for _ in range(3):  # three 2 s blips; the broker comes back empty (no persistence)
        step = _steps(lc_client.get(f"/v1/jobs/{job['id']}").json())
        own_redis.blip(2.0)
        seen = wait_for(lc_client, job["id"], lambda j, s=step: j["status"] != "running" or _steps(j) >= s + 4, poll=0.05)
        assert seen["status"] == "running" and seen["attempts"] == 1, seen
    done = wait_for(lc_client, job["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1, done
    assert done["summary"]["steps"] == 240
    rows = _attempts(sessions, job["id"])
    assert [(a.attempt, a.outcome) for a in rows] == [(1, "succeeded")]
    assert lc.worker.poll() is None, "the worker exited over a broker outage"
    # the worker consumes again from the restarted broker
    after = lc_client.post("/v1/jobs", json={**TINY, "epochs": 1}).json()
    done = wait_for(lc_client, after["id"], lambda j: j["status"] in TERMINAL, timeout=90)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


# -- (5) a stalled supervisor is fenced -----------------------------------------------------------

def test_sigstopped_supervisor_is_fenced(lc, lc_client, lc_env, sessions) -> None:  # type: ignore[no-untyped-def]
    # 240 steps: still training after the standby worker's start-up on an idle machine
    job = lc_client.post("/v1/jobs", json={**TINY, "epochs": 60}).json()
    job_dir = _job_dir(lc_env, job["id"])
    wait_for(lc_client, job["id"], lambda j: j["status"] == "running" and _steps(j) >= 12, poll=0.05)
    (first,) = _attempts(sessions, job["id"])
    pool_pid, runner_pid = int(first.worker.rsplit(":", 1)[1]), first.pid
    assert runner_pid and pid_alive(runner_pid)
    other = _spawn_worker(lc, "ssqlstandby")
    try:
        time.sleep(3.0)  # the standby worker is up and consuming
        # a checkpoint has been published for the next attempt to resume from (on a loaded machine
        # the supervisor may publish a little after the runner reported the step)
        deadline = time.monotonic() + 30
        while not (job_dir / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (job_dir / "last.pt").exists(), "no checkpoint was published before the stop"
        assert [(a.attempt, a.ended_at) for a in _attempts(sessions, job["id"])] == [(1, None)], "attempt 1 lost its lease before the stop"
        os.kill(pool_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            # the runner of a supervisor that stopped renewing its lease stops itself, before the
            # lease (4 s) runs out and another attempt may start
            while pid_alive(runner_pid) and time.monotonic() - stopped_at < 10:
                time.sleep(0.05)
            assert not pid_alive(runner_pid), "the runner of a stalled supervisor kept training"
            runner_gone = time.monotonic() - stopped_at
            done = wait_for(lc_client, job["id"], lambda j: j["status"] in TERMINAL, timeout=180)
            assert done["status"] == "succeeded", done
            assert done["summary"]["steps"] == 240
            rows = _attempts(sessions, job["id"])
            assert [a.attempt for a in rows] == [1, 2]
            # the superseded attempt's row was closed when it was reaped / re-claimed
            assert rows[0].outcome == "lost" and rows[0].ended_at is not None
            assert as_utc(rows[1].started_at) >= as_utc(rows[0].ended_at)
            assert rows[1].resumed_from and rows[1].resumed_from.endswith("last.pt")
            # each attempt wrote into its own folder
            dirs = [json.loads((job_dir / f"attempt-{n}.json").read_text())["workdir"] for n in (1, 2)]
            assert dirs[0] != dirs[1] and all(re.search(r"/attempts/\d+$", d) for d in dirs), dirs
            published = job_dir / "last.pt"
            final_sha = _sha(published)
        finally:
            os.kill(pool_pid, signal.SIGCONT)
        # the stalled supervisor wakes up, finds its lease gone, and publishes nothing
        rows = _wait_attempt(sessions, job["id"], lambda r: r[0].outcome == "lease_lost", timeout=30)
        assert _sha(published) == final_sha, "a superseded attempt overwrote the job's checkpoint"
        assert not Path(dirs[0]).exists()
        print(f"runner of the stalled supervisor gone after {runner_gone:.1f} s")
    finally:
        _stop(other)


# -- (8) a graceful stop hands the job back ------------------------------------------------------

def test_sigterm_to_worker_hands_job_back_without_spending_an_attempt(lc, lc_client, sessions) -> None:  # type: ignore[no-untyped-def]
    worker = lc.worker
    job = lc_client.post("/v1/jobs", json={**TINY, "epochs": 32}).json()
    wait_for(lc_client, job["id"], lambda j: j["status"] == "running" and _steps(j) >= 12, poll=0.05)
    (first,) = _attempts(sessions, job["id"])
    os.kill(worker.pid, signal.SIGTERM)  # the main process only, as `docker compose stop` does
    sent = time.monotonic()
    back = wait_for(lc_client, job["id"], lambda j: j["status"] != "running", timeout=30, poll=0.05)
    assert back["status"] == "queued", back
    assert back["attempts"] == 0, back
    step_back = _steps(back)
    worker.wait(30)
    stop_s = time.monotonic() - sent
    assert not pid_alive(first.pid)
    (row,) = _attempts(sessions, job["id"])
    assert row.outcome == "handed_back" and row.ended_at is not None

    lc.start_worker()
    done = wait_for(lc_client, job["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1, done
    assert done["summary"]["steps"] == 128
    rows = _attempts(sessions, job["id"])
    assert [(a.attempt, a.outcome) for a in rows] == [(1, "handed_back"), (2, "succeeded")]
    assert rows[1].resumed_from and rows[1].resumed_from.endswith("last.pt")
    # resumed from the checkpoint it stopped at: nothing redone
    metrics = lc_client.get(f"/v1/jobs/{job['id']}/metrics", params={"limit": 10000}).json()["items"]
    first_of_second = min(m["step"] for m in metrics if m["attempt"] == 2)
    assert first_of_second > step_back, (first_of_second, step_back)
    print(f"worker stopped {stop_s:.1f} s after SIGTERM, job handed back at step {step_back}")


def test_compose_stop_grace_covers_a_hand_back() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grace = compose["services"]["worker"]["stop_grace_period"]
    seconds = int(grace.rstrip("s"))
    defaults = Settings()
    assert seconds > defaults.handback_seconds + defaults.cancel_grace_seconds
