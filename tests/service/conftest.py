"""Fixtures of the service tests: a fresh Postgres database, a Redis queue of our own, and a real
API process plus a real Celery worker process (no mocks of Postgres, Redis or Celery).

Lease, heartbeat and reconciler periods are shortened so that failure handling shows in seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from persistence.db import make_engine, make_sessionmaker
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.settings import Settings
from ssql_cli.stack import Stack, free_port

PG_HOST, PG_PORT, PG_ADMIN_DB = "127.0.0.1", 5432, "test"
REDIS_URL = "redis://127.0.0.1:6379/9"

#: the tiny training run of the tests: a few seconds on 2 CPU cores
TINY = {
    "kind": "pretrain",
    "method": "ssql",
    "backbone": "resnet18",
    "dataset": "synthetic",
    "batch_size": 16,
    "image_size": 16,
    "width": 0.0625,
    "max_samples": 64,
    "checkpoint_every_steps": 4,
}


def _pg_user() -> str:
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_ADMIN_DB, user=user, connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    pytest.fail("Postgres is not reachable on 127.0.0.1:5432 (db 'test', user postgres or root); see README")


def create_database(prefix: str) -> tuple[str, Callable[[], None]]:
    """A fresh database for this test session; returns its URL and a function that drops it."""
    user = _pg_user()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_ADMIN_DB, user=user, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_ADMIN_DB, user=user, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}", drop


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment of the service processes: no SSQL_* from the developer's shell leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url, drop = create_database("ssql_test")
    yield url
    drop()


@pytest.fixture(scope="session")
def queue_name() -> Iterator[str]:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError:
        pytest.fail("Redis is not reachable on 127.0.0.1:6379; see README")
    name = f"gpu-test-{uuid.uuid4().hex[:8]}"
    yield name
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(name)


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ssql_home")


@pytest.fixture(scope="session")
def service_env(pg_url: str, queue_name: str, home: Path) -> dict[str, str]:
    return clean_env(
        SSQL_HOME=str(home),
        SSQL_DATABASE_URL=pg_url,
        SSQL_BROKER_URL=REDIS_URL,
        SSQL_QUEUE=queue_name,
        SSQL_DEVICE="cpu",
        SSQL_MAX_EPOCHS="400",
        SSQL_MAX_ATTEMPTS="3",
        SSQL_LEASE_SECONDS="4",
        SSQL_HEARTBEAT_SECONDS="0.5",
        SSQL_RECONCILE_SECONDS="1",
        SSQL_STALE_QUEUED_SECONDS="60",
        SSQL_CANCEL_GRACE_SECONDS="5",
        SSQL_AUTH_CACHE_SECONDS="30",
        SSQL_TORCH_THREADS="1",
    )


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    return Settings(
        home=Path(service_env["SSQL_HOME"]),
        database_url=service_env["SSQL_DATABASE_URL"],
        broker_url=service_env["SSQL_BROKER_URL"],
        queue=service_env["SSQL_QUEUE"],
    )


@pytest.fixture(scope="session")
def sessions(settings: Settings):  # type: ignore[no-untyped-def]
    upgrade_head(settings)
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def stack(service_env: dict[str, str], sessions, home: Path) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    s = Stack(service_env, free_port(), log_dir=home / "logs")
    s.start(timeout=90)
    yield s
    s.stop()


@pytest.fixture()
def live_worker(stack: Stack) -> Stack:
    """The stack, with its worker restarted if an earlier test killed it."""
    if stack.worker is None or stack.worker.poll() is not None:
        stack.start_worker()
        time.sleep(1.0)
    return stack


def _key(sessions, name: str) -> str:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return create_key(s, name)


@pytest.fixture(scope="session")
def api_key(sessions) -> str:  # type: ignore[no-untyped-def]
    return _key(sessions, "alice")


@pytest.fixture(scope="session")
def other_key(sessions) -> str:  # type: ignore[no-untyped-def]
    return _key(sessions, "mallory")


@pytest.fixture(scope="session")
def client(stack: Stack, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def other_client(stack: Stack, other_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {other_key}"}, timeout=30) as c:
        yield c


def wait_for(client: httpx.Client, job_id: str, pred, timeout: float = 120.0, poll: float = 0.1) -> dict:  # type: ignore[no-untyped-def]
    """Poll the job until ``pred(job)``; returns the job. Fails with the last status on timeout."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if pred(job):
            return job
        time.sleep(poll)
    raise AssertionError(f"timed out waiting on job {job_id}: {job}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as dead
    try:
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    except OSError:
        return True
    return bool(state) and not state.startswith("Z")


@pytest.fixture(scope="session")
def finished_pretrain(client: httpx.Client, stack: Stack) -> str:
    """A tiny pretrain job of the main owner that has succeeded."""
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 2})
    assert resp.status_code == 201, resp.text
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    return job["id"]


#: the Pareto tests' two tiny evaluations of ``finished_pretrain`` (tests/service/test_pareto_plot.py,
#: test_dashboard_pareto.py): uniform bit-widths with an autobit row, and AdaRound at two bit-widths
PARETO_EVALS = (
    {"bits": ["fp", "4w4a", "2w4a"], "autobit": {"budget_bits": 3.0, "a_bits": 4, "sensitivity": "quant_error", "images": 16}},
    {"bits": ["4w4a", "2w4a"], "ptq": "adaround", "ptq_images": 16, "ptq_iters": 2,
     "name": '<img src=x onerror="window.__pwned = 3">adaround'},  # shown as text, never markup
)


@pytest.fixture(scope="session")
def pareto_evals(client: httpx.Client, finished_pretrain: str) -> list[str]:
    """Two finished eval jobs of ``finished_pretrain`` (PARETO_EVALS): 1 epoch, 64 images each."""
    ids = []
    for extra in PARETO_EVALS:
        body = {"kind": "eval", "source_job": finished_pretrain, "epochs": 1, "batch_size": 32, "calib_images": 16,
                "max_samples": 64, **extra}
        resp = client.post("/v1/jobs", json=body)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    for job_id in ids:
        job = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=240)
        assert job["status"] == "succeeded", job
    return ids


# -- the dashboard's browser (Debian's Chromium driven by Playwright; tests/service/browser.py) ---
@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    """One headless Chromium per test module; skips where Chromium or Playwright is missing."""
    from tests.service.browser import ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where pages are photographed: docs/screenshots with SSQL_UPDATE_SCREENSHOTS=1, else a temp folder."""
    from tests.service.browser import ROOT

    if os.environ.get("SSQL_UPDATE_SCREENSHOTS") == "1":
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("screenshots")
