"""Issue 19, item 3: fair queueing (docs/decisions/019). The rule on a database of its own (real
Postgres, and SQLite as embedded mode runs it), the reconciler's count of spare wake-ups on a
Redis queue of its own, and two owners through the real API, Celery worker and Redis."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from persistence import fair_share, quotas
from persistence.db import as_utc, make_engine, make_sessionmaker, utcnow
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.models import Job, JobAttempt, User
from persistence.queue import make_celery, publish_job
from persistence.settings import Settings
from tests.service.conftest import REDIS_URL, TINY, create_database, wait_for
from worker.reconciler import BrokerQueue, reconcile_once

pytestmark = pytest.mark.service
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    """A database of its own (the stack's worker must not see these jobs) and a queue of its own."""
    queue = f"fair-test-{uuid.uuid4().hex[:8]}"
    if request.param == "postgresql":
        url, drop = create_database("ssql_fair")
    else:
        url, drop = f"sqlite:///{tmp_path / 'fair.db'}", lambda: None
    settings = Settings(home=tmp_path, database_url=url, broker_url=REDIS_URL, queue=queue, stale_queued_seconds=0.3)
    upgrade_head(settings)
    engine = make_engine(settings)
    try:
        yield settings, make_sessionmaker(engine)
    finally:
        engine.dispose()
        redis.Redis.from_url(REDIS_URL).delete(queue)
        drop()


def _owner(Sessions: sessionmaker[Session], name: str) -> int:
    with Sessions() as s:
        create_key(s, name)
        return int(s.scalar(select(User.id).where(User.name == name)))


def _queue(Sessions: sessionmaker[Session], owner: int, n: int, *, priority: int = 0, devices: int | None = None,
           age_s: float = 0.0) -> list[str]:
    """``n`` queued jobs of ``owner`` created ``age_s`` seconds ago (1 ms apart, in order)."""
    now = utcnow() - timedelta(seconds=age_s)
    config = {**TINY, "devices": devices} if devices else dict(TINY)
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with Sessions() as s:
        for i, job_id in enumerate(ids):
            at = now + timedelta(milliseconds=i)
            s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="queued", spec={"config": config},
                      attempts=0, max_attempts=3, cancel_requested=False, priority=priority, created_at=at,
                      updated_at=at, published_at=at))  # fmt: skip
        s.commit()
    return ids


def _ran(Sessions: sessionmaker[Session], owner: int, seconds: float, devices: int = 1, ago_s: float = 0.0) -> None:
    """A finished job of ``owner`` that held ``devices`` for ``seconds``, ending ``ago_s`` ago."""
    end = utcnow() - timedelta(seconds=ago_s)
    start = end - timedelta(seconds=seconds)
    job_id = str(uuid.uuid4())
    with Sessions() as s:
        s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="succeeded", spec={"config": {"devices": devices}},
                  attempts=1, claims=1, max_attempts=3, cancel_requested=False, created_at=start, updated_at=end,
                  started_at=start, finished_at=end))  # fmt: skip
        s.add(JobAttempt(job_id=job_id, attempt=1, worker="w:1", started_at=start, ended_at=end, outcome="succeeded"))
        s.commit()


def _claim(settings: Settings, Sessions: sessionmaker[Session], worker: str = "w:1") -> str | None:
    with Sessions() as s:
        decision = fair_share.claim_next(s, settings, worker, 60)
    return None if decision.claimed is None else decision.claimed.id


def _finish(Sessions: sessionmaker[Session], job_id: str) -> None:
    with Sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded", finished_at=utcnow()))
        s.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
                  .values(ended_at=utcnow(), outcome="succeeded"))  # fmt: skip
        s.commit()


def test_decayed_device_time_is_the_integral_of_the_half_life_weight() -> None:
    now = utcnow()
    hour = timedelta(hours=1)
    # one hour that ended now, half-life 1 h: integral of 2^-t over [0, 1] h = 1 / (2 ln 2) h
    assert math.isclose(fair_share.decayed_seconds(now - hour, now, now, 3600), 3600 / (2 * math.log(2)), rel_tol=1e-9)
    # the same hour a half-life earlier counts half; an interval running on past now is cut at now
    assert math.isclose(fair_share.decayed_seconds(now - 2 * hour, now - hour, now, 3600),
                        fair_share.decayed_seconds(now - hour, now, now, 3600) / 2, rel_tol=1e-9)  # fmt: skip
    assert fair_share.decayed_seconds(now - hour, now + hour, now, 3600) == fair_share.decayed_seconds(now - hour, now, now, 3600)
    assert fair_share.decayed_seconds(now, now - hour, now, 3600) == 0.0


def test_the_owner_that_used_least_goes_first_and_priorities_order_an_owners_own_jobs(db) -> None:  # type: ignore[no-untyped-def]
    settings, Sessions = db
    heavy, light = _owner(Sessions, "heavy"), _owner(Sessions, "light")
    _ran(Sessions, heavy, seconds=600)  # heavy used ten device-minutes lately; light nothing
    _ran(Sessions, light, seconds=60, ago_s=5)
    old = _queue(Sessions, heavy, 5, age_s=3600)  # queued an hour before light's
    low, high = _queue(Sessions, light, 1, priority=-5), _queue(Sessions, light, 1, priority=7)
    # light first (less device-time), and its priority 7 job before its older priority -5 one
    first = _claim(settings, Sessions)
    assert first == high[0]
    _finish(Sessions, first)
    # light has run 60 s + (a moment of) its high job: still far below heavy's 600 s
    second = _claim(settings, Sessions)
    assert second == low[0]
    _finish(Sessions, second)
    # light has nothing queued now: heavy's jobs, oldest first
    assert _claim(settings, Sessions) == old[0]


def test_running_devices_come_first_then_weights_scale_the_share(db) -> None:  # type: ignore[no-untyped-def]
    settings, Sessions = db
    a, b = _owner(Sessions, "a"), _owner(Sessions, "b")
    _ran(Sessions, b, seconds=3600)  # b used an hour lately, a nothing
    _queue(Sessions, a, 3)
    b_jobs = _queue(Sessions, b, 3)
    running_a = _claim(settings, Sessions, "w:1")  # a: the least device-time
    with Sessions() as s:
        assert s.scalar(select(Job.owner_id).where(Job.id == running_a)) == a
    # a now holds one device, b none: b's next, although b used far more device-time
    assert _claim(settings, Sessions, "w:2") == b_jobs[0]
    # weight: with a at weight 3, a's one running device counts 1/3 against b's one: a again
    with Sessions() as s:
        assert quotas.set_quota(s, "a", {"weight": 3.0})["weight"] == 3.0
        with pytest.raises(ValueError, match="weight"):
            quotas.set_quota(s, "b", {"weight": 0})
    third = _claim(settings, Sessions, "w:3")
    with Sessions() as s:
        assert s.scalar(select(Job.owner_id).where(Job.id == third)) == a
        shares = {sh.owner_id: sh for sh in fair_share.shares(s, settings)}
    assert shares[a].weight == 3.0 and shares[a].running_devices == 2 and shares[b].running_devices == 1


def test_an_owner_at_its_running_quota_is_skipped_not_waited_for(db) -> None:  # type: ignore[no-untyped-def]
    settings, Sessions = db
    capped, other = _owner(Sessions, "capped"), _owner(Sessions, "other")
    with Sessions() as s:
        quotas.set_quota(s, "capped", {"max_running_jobs": 1})
    capped_jobs = _queue(Sessions, capped, 2)
    assert _claim(settings, Sessions) == capped_jobs[0]
    big = _queue(Sessions, other, 1, devices=2)  # other holds two devices, capped one
    assert _claim(settings, Sessions) == big[0]
    other_jobs = _queue(Sessions, other, 1)
    with Sessions() as s:  # capped's share is smaller but it is at its quota: other's job starts
        decision = fair_share.claim_next(s, settings, "w:2", 60)
    assert decision.claimed is not None and decision.claimed.id == other_jobs[0]
    assert decision.held_owners == frozenset({capped})
    with Sessions() as s:
        decision = fair_share.claim_next(s, settings, "w:3", 60)
    assert decision.claimed is None and decision.held_owners == frozenset({capped})
    _finish(Sessions, capped_jobs[0])
    assert _claim(settings, Sessions) == capped_jobs[1]


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # embedded mode (SQLite) runs one worker
def test_concurrent_claims_take_distinct_jobs_and_follow_the_shares(db) -> None:  # type: ignore[no-untyped-def]
    """Eight workers freed at once, two owners with equal history: every claim a distinct job, and
    the decisions, taken one at a time, split the devices four and four."""
    settings, Sessions = db
    owners = [_owner(Sessions, "x"), _owner(Sessions, "y")]
    for o in owners:
        _queue(Sessions, o, 10)
    got: list[str | None] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        got.append(_claim(settings, Sessions, f"w:{i}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert None not in got and len(set(got)) == 8
    with Sessions() as s:
        counts = [s.scalar(select(func.count()).select_from(Job).where(Job.owner_id == o, Job.status == "running"))
                  for o in owners]  # fmt: skip
    assert counts == [4, 4], counts


def test_spare_wakeups_cover_jobs_whose_message_started_another(db) -> None:  # type: ignore[no-untyped-def]
    """Messages are wake-ups: when job b starts on job a's message, b's message still waits and
    covers a. The reconciler publishes a again only when no such spare message waits."""
    settings, Sessions = db
    owner = _owner(Sessions, "recon")
    a, b, c = _queue(Sessions, owner, 3, age_s=5)
    app = make_celery(settings)
    published: list[str] = []

    def publish(job_id: str) -> None:
        publish_job(app, job_id, settings.queue)
        published.append(job_id)

    try:
        for job_id in (b, c):  # a's message was consumed by a worker that started b
            publish_job(app, job_id, settings.queue)
        with Sessions() as s:
            s.execute(update(Job).where(Job.id == b).values(status="running", lease_until=utcnow() + timedelta(minutes=5)))
            s.commit()
        assert BrokerQueue(settings).job_ids() == {b, c}
        for _ in range(3):
            reconcile_once(settings, Sessions, publish)
            time.sleep(settings.stale_queued_seconds)
        assert published == []  # b's message covers a
        redis.Redis.from_url(REDIS_URL).delete(settings.queue)  # the broker loses every message
        for _ in range(3):
            reconcile_once(settings, Sessions, publish)
            time.sleep(settings.stale_queued_seconds)
        assert sorted(published) == sorted([a, c])  # each queued job once; none for the running b
    finally:
        app.close()


# --- the fairness test: two owners through the real API, Redis and Celery worker --------------------

#: the smallest job the service runs: two steps of one epoch
SMALL = {**TINY, "epochs": 1, "max_samples": 16, "batch_size": 8, "export_bits": []}


def _starts(sessions, owner_names: list[str]) -> list[tuple[str, str, object]]:  # type: ignore[no-untyped-def]
    """``(owner, job id, first attempt's start)`` of the owners' started jobs, in start order."""
    with sessions() as s:
        rows = s.execute(
            select(User.name, Job.id, JobAttempt.started_at)
            .join(Job, Job.owner_id == User.id).join(JobAttempt, JobAttempt.job_id == Job.id)
            .where(User.name.in_(owner_names), JobAttempt.attempt == 1)
            .order_by(JobAttempt.started_at, JobAttempt.id)
        ).all()  # fmt: skip
    return [(r[0], r[1], r[2]) for r in rows]


def test_a_second_owners_two_jobs_start_before_the_first_owners_fifty_finish(stack, live_worker, sessions) -> None:  # type: ignore[no-untyped-def]
    many, few = f"fifty-{uuid.uuid4().hex[:6]}", f"two-{uuid.uuid4().hex[:6]}"
    with sessions() as s:
        keys = {many: create_key(s, many), few: create_key(s, few)}
    clients = {n: httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {k}"}, timeout=30) for n, k in keys.items()}
    fifty: list[str] = []
    two: list[str] = []
    try:
        t0 = time.monotonic()
        for _ in range(50):
            r = clients[many].post("/v1/jobs", json=SMALL)
            assert r.status_code == 201, r.text
            fifty.append(r.json()["id"])
        wait_for(clients[many], fifty[0], lambda j: j["status"] != "queued", timeout=60)  # the first owner is running
        submitted_at = time.monotonic() - t0
        for _ in range(2):
            r = clients[few].post("/v1/jobs", json=SMALL)
            assert r.status_code == 201, r.text
            two.append(r.json()["id"])
        for job_id in two:
            wait_for(clients[few], job_id, lambda j: j["status"] != "queued", timeout=120)
        both_started = time.monotonic() - t0
    finally:
        for job_id in fifty + two:  # the rest of the fifty are not needed: cancelled while queued
            clients[many if job_id in fifty else few].post(f"/v1/jobs/{job_id}/cancel")
    for job_id in fifty + two:
        wait_for(clients[many if job_id in fifty else few], job_id, lambda j: j["status"] in TERMINAL, timeout=60)
    for c in clients.values():
        c.close()
    starts = _starts(sessions, [many, few])
    order = [name for name, _, _ in starts]
    few_positions = [i for i, name in enumerate(order) if name == few]
    many_before = order[: few_positions[-1]].count(many)
    print(f"\nfair share: the {few} jobs started at positions {[p + 1 for p in few_positions]} of {len(order)} starts; "
          f"{many_before} of the 50 had started by then (the first owner's first job running when the two were "
          f"submitted at {submitted_at:.1f} s; both started by {both_started:.1f} s)")
    for name, job_id, at in starts:
        print(f"  {at.isoformat()}  {'two  ' if name == few else 'fifty'}  {job_id}")
    assert len(few_positions) == 2
    with sessions() as s:
        submitted = min(as_utc(t) for t in s.scalars(select(Job.created_at).where(Job.id.in_(two))))
    # the two were submitted while the first owner ran: one of them starts next (a decision
    # already under way when they were committed aside), long before the fifty are through
    after = [name for name, _, at in starts if as_utc(at) > submitted]
    assert few in after[:2], order
    assert many_before <= 10, order
    assert order.count(many) < 50  # the rest of the fifty never started: cancelled while queued


def test_priority_and_weight_over_http_and_the_cli(stack, sessions, service_env) -> None:  # type: ignore[no-untyped-def]
    name = f"prio-{uuid.uuid4().hex[:6]}"
    with sessions() as s:
        key = create_key(s, name)
    env = {**service_env, "SSQL_URL": stack.url, "SSQL_API_KEY": key}

    def ssql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ssql_cli.main", *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        r = c.post("/v1/jobs", json={**SMALL, "epochs": 400, "priority": 7})
        assert r.status_code == 201, r.text
        job = r.json()
        c.post(f"/v1/jobs/{job['id']}/cancel")
        assert job["priority"] == 7 and "priority" not in job["spec"]["config"]  # no part of the spec
        assert c.get(f"/v1/jobs/{job['id']}").json()["priority"] == 7
        assert c.patch(f"/v1/jobs/{job['id']}", json={"priority": -3}).json()["priority"] == -3
        assert c.patch(f"/v1/jobs/{job['id']}", json={"priority": None}).json()["priority"] == 0
        for bad in (101, -101, 2.0, "1", True):
            r = c.patch(f"/v1/jobs/{job['id']}", json={"priority": bad})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "priority"], (bad, r.text)
        assert c.post("/v1/jobs", json={**SMALL, "priority": 1.5}).status_code == 422
        schema = c.get("/openapi.json").json()["components"]["schemas"]["PretrainRequest"]["properties"]["priority"]
        assert "fair share" in schema["description"]
        assert {"minimum": -100, "maximum": 100}.items() <= schema["anyOf"][0].items()  # stated, so fuzzers keep to it
    edited = ssql("edit", job["id"], "--priority", "12")
    assert edited.returncode == 0 and "priority 12" in edited.stdout, edited.stdout + edited.stderr
    weight = subprocess.run([sys.executable, "-m", "ssql_cli.main", "owners", "set-quota", name, "--weight", "2.5"],
                            env=service_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert weight.returncode == 0 and "weight=2.5" in weight.stdout, weight.stdout + weight.stderr
    bad = subprocess.run([sys.executable, "-m", "ssql_cli.main", "owners", "set-quota", name, "--weight", "0"],
                         env=service_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "weight must be above 0" in bad.stderr
    usage = ssql("usage")
    assert usage.returncode == 0 and "fair-share weight      2.5" in usage.stdout, usage.stdout
