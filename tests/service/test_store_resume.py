"""Two workers that share nothing but Postgres, Redis and the object store (S3 on moto's server):
the first is killed with SIGKILL mid-pretrain, the second, with its own empty folders, resumes
from the ``last.pt`` mirrored in the store and ends with the weights of an uninterrupted run
(decision 018).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from persistence.db import make_engine, make_sessionmaker
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.models import Job, JobAttempt
from persistence.settings import Settings
from ssql_cli.stack import Stack, free_port, worker_command
from tests.service.conftest import REDIS_URL, TINY, clean_env, create_database, pid_alive, wait_for
from tests.service.s3 import CREDENTIALS, moto_endpoint

pytestmark = pytest.mark.service
BUCKET = "ssql-resume"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    url, drop = create_database("ssql_resume")
    queue = f"gpu-resume-{uuid.uuid4().hex[:8]}"
    homes = {n: tmp_path_factory.mktemp(f"host_{n}") for n in ("a", "b")}
    with moto_endpoint(BUCKET) as endpoint:
        def env(home: Path) -> dict[str, str]:
            return clean_env(
                SSQL_HOME=str(home), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS_URL, SSQL_QUEUE=queue, SSQL_DEVICE="cpu",
                SSQL_LEASE_SECONDS="4", SSQL_HEARTBEAT_SECONDS="0.5", SSQL_RECONCILE_SECONDS="1", SSQL_TORCH_THREADS="1",
                SSQL_STALE_QUEUED_SECONDS="60", SSQL_STORAGE_URL=f"s3://{BUCKET}/ckpt", AWS_ENDPOINT_URL=endpoint, **CREDENTIALS,
                SSQL_DATA_ROOT="/nonexistent/ssql-data",  # the same config on both hosts (synthetic data reads nothing)
            )
        settings = Settings(home=homes["a"], database_url=url, broker_url=REDIS_URL, queue=queue)
        upgrade_head(settings)
        engine = make_engine(settings)
        sessions = make_sessionmaker(engine)
        stack = Stack(env(homes["a"]), free_port(), log_dir=homes["a"] / "logs")  # the API and host a's worker
        stack.start(timeout=90)
        with sessions() as s:
            key = create_key(s, "alice")
        client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        other: list[subprocess.Popen] = []
        try:
            yield {"stack": stack, "client": client, "sessions": sessions, "env_b": env(homes["b"]), "homes": homes,
                   "queue": queue, "other": other}
        finally:
            client.close()
            for p in other:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()
            stack.stop()
            engine.dispose()
            drop()


def _fp_sha(client: httpx.Client, job_id: str) -> str:
    rows = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    (fp,) = [r for r in rows if r["bits"] == "fp" and r["format"] == "torch"]
    return fp["sha256"]


def test_second_host_resumes_from_the_stored_checkpoint(two_hosts: dict) -> None:
    client, stack, sessions = two_hosts["client"], two_hosts["stack"], two_hosts["sessions"]
    body = {**TINY, "epochs": 30, "export_bits": []}  # 120 steps, a checkpoint every 4
    straight = client.post("/v1/jobs", json=body).json()
    done = wait_for(client, straight["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=180)
    assert done["status"] == "succeeded", done
    reference = _fp_sha(client, straight["id"])

    job = client.post("/v1/jobs", json=body).json()

    def mirrored(j: dict) -> bool:
        if j["status"] != "running" or (j["progress"].get("step") or 0) < 12:
            return False
        with sessions() as s:
            return s.scalar(select(Job.checkpoint_sha256).where(Job.id == job["id"])) is not None

    wait_for(client, job["id"], mirrored, poll=0.05)
    with sessions() as s:
        first = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job["id"])).one()
    stack.kill_worker()  # SIGKILL, the whole worker of host a
    deadline = time.monotonic() + 5
    while first.pid and pid_alive(first.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    step_at_kill = client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"]
    assert step_at_kill < 110, "killed too late to show a resume"

    home_b = two_hosts["homes"]["b"]
    assert not (home_b / "artifacts").exists()  # host b has nothing of the job
    log = (home_b / "worker.log").open("ab")
    two_hosts["other"].append(subprocess.Popen(worker_command(two_hosts["queue"], "ssql-b"), env=two_hosts["env_b"],
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    finished = wait_for(client, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=240)
    assert finished["status"] == "succeeded", finished
    assert finished["attempts"] == 2 and finished["summary"]["steps"] == 120

    with sessions() as s:
        attempts = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job["id"]).order_by(JobAttempt.attempt)).all()
    second = attempts[-1]
    assert second.worker and second.worker != first.worker
    assert second.resumed_from and second.resumed_from.startswith(str(home_b))  # fetched from the store onto host b
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics", params={"limit": 10000}).json()["items"]
    assert min(m["step"] for m in metrics if m["attempt"] == second.attempt) > 4  # resumed, not restarted
    assert _fp_sha(client, job["id"]) == reference  # the same weights as the uninterrupted run
    assert (home_b / "artifacts" / "jobs" / job["id"] / "last.pt").is_file()
    # host a lacks the second attempt's log: the API reads the copy host b's worker kept in the store
    assert not (two_hosts["homes"]["a"] / "artifacts" / "jobs" / job["id"] / f"attempt-{second.attempt}.log").exists()
    text = client.get(f"/v1/jobs/{job['id']}/logs").text
    assert f"==> attempt {first.attempt} <==" in text and f"==> attempt {second.attempt} <==" in text
    assert "result:" in text.split(f"==> attempt {second.attempt} <==")[1]

    # the API runs on host a, which never had the finished files: it serves them from the store, verified
    on_a = two_hosts["homes"]["a"] / "artifacts" / "jobs" / job["id"] / "backbone.pt"
    assert not on_a.exists()
    dl = client.get(f"/v1/jobs/{job['id']}/checkpoints/fp", params={"format": "torch"})
    assert dl.status_code == 200 and _sha_bytes(dl.content) == reference == dl.headers["etag"].strip('"')
    part = client.get(f"/v1/jobs/{job['id']}/checkpoints/fp", params={"format": "torch"}, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == dl.content[:10]
    # ... from the API's bounded copy (SSQL_API_FETCHED_MAX_BYTES), not into the artifacts folder
    assert not on_a.exists() and (two_hosts["homes"]["a"] / "cache" / "fetched" / reference).is_file()

    # back on host a (its copy of the job's last.pt is attempt 1's, stale): an evaluation reads the
    # stored final checkpoint, verified against the digest pinned at submission
    two_hosts["other"][-1].kill()
    two_hosts["other"][-1].wait()
    stale = two_hosts["homes"]["a"] / "artifacts" / "jobs" / job["id"] / "last.pt"
    assert stale.is_file()
    stack.start_worker()
    ev = client.post("/v1/jobs", json={"kind": "eval", "source_job": job["id"], "bits": ["fp"], "epochs": 1,
                                      "max_samples": 64, "batch_size": 32})
    assert ev.status_code == 201, ev.text
    ev_done = wait_for(client, ev.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=180)
    assert ev_done["status"] == "succeeded", ev_done
    with sessions() as s:
        assert s.scalar(select(Job.checkpoint_sha256).where(Job.id == job["id"])) == _sha(stale)

    # and back on host b: an export of the evaluation reads its heads.pt, written on host a
    stack.kill_worker()
    heads_on_b = home_b / "artifacts" / "jobs" / ev.json()["id"] / "heads.pt"
    assert not heads_on_b.exists()
    two_hosts["other"].append(subprocess.Popen(worker_command(two_hosts["queue"], "ssql-b2"), env=two_hosts["env_b"],
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    ex = client.post(f"/v1/jobs/{ev.json()['id']}/exports", json={"bits": ["fp"], "formats": ["safetensors"]})
    assert ex.status_code == 202, ex.text
    ex_done = wait_for(client, ex.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=180)
    assert ex_done["status"] == "succeeded", ex_done
    assert heads_on_b.is_file()


def _sha(path: Path) -> str:
    return _sha_bytes(path.read_bytes())


def _sha_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
