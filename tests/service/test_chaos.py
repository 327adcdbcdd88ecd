"""Issue 19, item 5: a bounded chaos run in CI whose job outcomes are asserted. A stack of its own
(its own Postgres cluster and its own redis-server, both restarted here; never the shared
servers), two tiny jobs, and while the first runs: a Redis restart (every message lost), a Postgres
restart (an immediate stop, like a crash) and a ``kill -9`` of the worker's whole process group.
Every job must end ``succeeded``, none lost or run twice at once. The long version of this is
``bench/chaos.py`` (docs/RESULTS.md, "Chaos run")."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import select

from persistence.db import as_utc, make_engine, make_sessionmaker
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.models import Job, JobAttempt
from persistence.settings import Settings
from ssql_cli.stack import OwnPostgres, OwnRedis, Stack, free_port, postgres_bindir
from tests.service.conftest import TINY, clean_env, wait_for

pytestmark = [pytest.mark.service,
              pytest.mark.skipif(postgres_bindir() is None, reason="needs Postgres' initdb/pg_ctl (Debian: postgresql)")]
TERMINAL = ("succeeded", "failed", "cancelled")
LEASE_S = 4.0


@pytest.fixture()
def chaos(tmp_path: Path) -> Iterator[SimpleNamespace]:
    pg = OwnPostgres().init()
    pg.start()
    own_redis = OwnRedis(tmp_path)
    own_redis.start()
    home = tmp_path / "home"
    env = clean_env(SSQL_HOME=str(home), SSQL_DATABASE_URL=pg.url, SSQL_BROKER_URL=own_redis.url, SSQL_QUEUE="chaos",
                    SSQL_DEVICE="cpu", SSQL_MAX_ATTEMPTS="3", SSQL_LEASE_SECONDS=str(LEASE_S), SSQL_HEARTBEAT_SECONDS="0.5",
                    SSQL_RECONCILE_SECONDS="1", SSQL_STALE_QUEUED_SECONDS="2", SSQL_CANCEL_GRACE_SECONDS="5",
                    SSQL_TORCH_THREADS="1")  # fmt: skip
    settings = Settings(home=home, database_url=pg.url, broker_url=own_redis.url, queue="chaos")
    upgrade_head(settings)
    engine = make_engine(settings)
    Sessions = make_sessionmaker(engine)
    with Sessions() as s:
        key = create_key(s, "chaos")
    stack = Stack(env, free_port(), log_dir=home / "logs")
    try:
        stack.start(timeout=90)
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            yield SimpleNamespace(stack=stack, client=client, pg=pg, redis=own_redis, Sessions=Sessions, home=home)
    finally:
        if stack.worker is not None and stack.worker.poll() is None:
            stack.kill_worker()  # the run is over: no graceful hand-back to wait for
        stack.stop(grace=5)
        engine.dispose()
        own_redis.kill()
        pg.destroy()


def _progressed(steps: int):  # type: ignore[no-untyped-def]
    """A job that is running and has trained at least ``steps`` steps."""
    return lambda j: j["status"] in TERMINAL or (j["status"] == "running" and (j["progress"].get("step") or 0) >= steps)


def _retrying(client: httpx.Client, job_id: str, pred, timeout: float):  # type: ignore[no-untyped-def]
    """``wait_for`` that rides over the API's 503s while the database restarts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return wait_for(client, job_id, pred, timeout=max(1.0, deadline - time.monotonic()), poll=0.2)
        except (KeyError, TypeError, ValueError, httpx.HTTPError):  # a 503 body, or the connection reset
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_jobs_survive_redis_and_postgres_restarts_and_a_killed_worker(chaos) -> None:  # type: ignore[no-untyped-def]
    c = chaos.client
    ids = []
    for body in ({**TINY, "epochs": 8, "seed": 1}, {**TINY, "epochs": 1, "seed": 2}):
        r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    victim = ids[0]
    t0 = time.monotonic()
    # while the first job trains and the second waits: Redis restarts empty (the waiting job's
    # message and the running one's unacked message are gone), Postgres stops at once (like a
    # crash) and restarts, then, once the job has published a checkpoint, its worker is killed
    # with -9 (main and pool processes): the reaper requeues it after its lease and it resumes
    first = _retrying(c, victim, _progressed(2), 90)
    assert first["status"] == "running", first
    chaos.redis.blip(1.0)
    faults = [f"redis restart at {time.monotonic() - t0:.1f} s"]
    chaos.pg.blip(1.0)
    faults.append(f"postgres restart at {time.monotonic() - t0:.1f} s")
    checkpointed = _retrying(c, victim, _progressed(5), 90)  # a checkpoint every 4 steps
    assert checkpointed["status"] == "running", checkpointed
    chaos.stack.kill_worker()
    faults.append(f"kill -9 worker at {time.monotonic() - t0:.1f} s")
    time.sleep(0.5)
    chaos.stack.start_worker()
    done = {job_id: _retrying(c, job_id, lambda j: j["status"] in TERMINAL, 150) for job_id in ids}

    with chaos.Sessions() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        attempts = s.execute(select(JobAttempt.job_id, JobAttempt.attempt, JobAttempt.started_at, JobAttempt.ended_at,
                                    JobAttempt.outcome).order_by(JobAttempt.started_at)).all()  # fmt: skip
    print(f"\nchaos: faults {faults}; all ended at {time.monotonic() - t0:.1f} s; attempts " + ", ".join(f"{a.job_id[:8]}#{a.attempt}:{a.outcome}" for a in attempts))
    # every job succeeded; nothing lost, nothing made up
    assert {k: v["status"] for k, v in done.items()} == dict.fromkeys(ids, "succeeded"), done
    assert set(jobs) == set(ids)
    for job_id in ids:
        mine = [a for a in attempts if a.job_id == job_id]
        assert [a.outcome for a in mine].count("succeeded") == 1, mine  # one run counted
        assert len({a.attempt for a in mine}) == len(mine) and all(a.ended_at is not None for a in mine), mine
        for before, after in zip(mine, mine[1:], strict=False):  # never two attempts of one job at once
            assert as_utc(before.ended_at) <= as_utc(after.started_at), mine
    killed = [a.outcome for a in attempts if a.job_id == victim]
    assert "lost" in killed and killed[-1] == "succeeded", killed  # the killed attempt, then the resumed one
    with chaos.Sessions() as s:
        resumed = s.scalars(select(JobAttempt.resumed_from).where(JobAttempt.job_id == victim)).all()
    assert any(resumed), "the attempt after the kill did not resume from the job's checkpoint"
