"""A real worker runs real (tiny) training: progress, metrics, results, checkpoints, cancel."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
from sqlalchemy import select

from api.specs import DEFAULT_EXPORT_BITS
from persistence.models import JobAttempt
from persistence.queue import make_celery, publish_job
from tests.service.conftest import TINY, pid_alive, wait_for


def test_submit_run_succeeds_with_rising_progress(client: httpx.Client, live_worker) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 40})
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["progress"]["fraction"] == 0.0
    seen: list[float] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] == "running" and job["progress"].get("step"):
            seen.append(job["progress"]["fraction"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    below_one = {f for f in seen if 0.0 < f < 1.0}
    assert len(below_one) >= 2, f"expected several progress values below 1 while running, saw {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    p = job["progress"]
    assert p["fraction"] == 1.0 and p["epochs"] == 40 and p["step"] == p["total_steps"] == 160
    assert job["attempts"] == 1 and job["error"] is None
    assert job["summary"]["steps"] == 160

    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    assert len(metrics) >= 10
    assert all(m["loss"] is not None and m["lr"] is not None and m["images_per_s"] for m in metrics)
    assert [m["step"] for m in metrics] == sorted(m["step"] for m in metrics)


def test_checkpoint_download_matches_etag_and_supports_range(client: httpx.Client, finished_pretrain: str) -> None:
    # the pretrain's own files: the FP torch backbone, then the paper's bit-widths as packed files
    # (width 0.0625: no torchvision file); exports other tests ask of this shared job come later
    ckpts = [c for c in client.get(f"/v1/jobs/{finished_pretrain}/checkpoints").json() if c["produced_by"] is None]
    assert [(c["bits"], c["format"]) for c in ckpts] == [("fp", "torch")] + [(b, "safetensors") for b in DEFAULT_EXPORT_BITS]
    ck = ckpts[0]
    resp = client.get(ck["url"])
    assert resp.status_code == 200
    assert resp.headers["etag"] == f'"{ck["sha256"]}"'
    assert int(resp.headers["content-length"]) == ck["bytes"] == len(resp.content)
    assert hashlib.sha256(resp.content).hexdigest() == ck["sha256"]
    part = client.get(ck["url"], headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == resp.content[10:20]
    assert client.get(ck["url"], headers={"If-None-Match": resp.headers["etag"]}).status_code == 304
    assert client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/7w7a").status_code == 404
    assert client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/fp", params={"format": "onnx"}).status_code == 404


def test_eval_job_results_per_bit_width(client: httpx.Client, finished_pretrain: str, live_worker) -> None:  # type: ignore[no-untyped-def]
    body = {"kind": "eval", "source_job": finished_pretrain, "bits": ["fp", "8w8a", "4w4f", "2w4a"], "epochs": 2,
            "batch_size": 32, "calib_images": 16, "max_samples": 64}  # fmt: skip
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["config"]["bits"] == ["fp", "8w8a", "4w4a", "2w4a"]
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    rows = client.get(f"/v1/jobs/{job['id']}/results").json()["rows"]
    assert [r["bits"] for r in rows] == ["fp", "8w8a", "4w4a", "2w4a"]
    for r in rows:
        assert r["protocol"] == "linear" and 0.0 <= r["top1"] <= 100.0 and r["dataset"] == "synthetic"


def test_cancel_mid_run_stops_the_training_process(client: httpx.Client, live_worker, sessions) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/v1/jobs", json={**TINY, "epochs": 400}).json()
    wait_for(client, job["id"], lambda j: j["status"] == "running" and (j["progress"].get("step") or 0) >= 8)
    with sessions() as s:
        pid = s.scalar(select(JobAttempt.pid).where(JobAttempt.job_id == job["id"]))
    assert pid and pid_alive(pid)
    t0 = time.monotonic()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202
    done = wait_for(client, job["id"], lambda j: j["status"] != "running", timeout=30)
    assert done["status"] == "cancelled", done
    assert time.monotonic() - t0 < 10
    assert 0 < done["progress"]["fraction"] < 1
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), "the training process survived its cancellation"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_cancel_queued_job_is_immediate(client: httpx.Client, settings, live_worker) -> None:  # type: ignore[no-untyped-def]
    blocker = client.post("/v1/jobs", json={**TINY, "epochs": 400}).json()
    wait_for(client, blocker["id"], lambda j: j["status"] == "running")
    queued = client.post("/v1/jobs", json={**TINY, "epochs": 1}).json()
    resp = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    client.post(f"/v1/jobs/{blocker['id']}/cancel")
    wait_for(client, blocker["id"], lambda j: j["status"] == "cancelled", timeout=30)
    assert client.get(f"/v1/jobs/{queued['id']}").json()["attempts"] == 0


def test_duplicate_delivery_runs_the_job_once(client: httpx.Client, settings, sessions, live_worker) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/v1/jobs", json={**TINY, "epochs": 8}).json()
    app = make_celery(settings)
    for _ in range(2):
        publish_job(app, job["id"], settings.queue)
    done = wait_for(client, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    time.sleep(1.0)  # let the duplicate deliveries arrive and be dropped
    assert done["status"] == "succeeded" and done["attempts"] == 1
    with sessions() as s:
        attempts = s.scalars(select(JobAttempt.attempt).where(JobAttempt.job_id == job["id"])).all()
    assert attempts == [1]


def test_failed_job_explains_what_went_wrong(client: httpx.Client, settings, live_worker) -> None:  # type: ignore[no-untyped-def]
    pre = client.post("/v1/jobs", json={**TINY, "epochs": 1, "seed": 11}).json()
    pre = wait_for(client, pre["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert pre["status"] == "succeeded", pre
    (settings.resolved_artifacts_dir() / "jobs" / pre["id"] / "last.pt").unlink()
    ev = client.post("/v1/jobs", json={"kind": "eval", "source_job": pre["id"], "bits": ["fp"], "epochs": 1}).json()
    done = wait_for(client, ev["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["code"] == "missing_checkpoint" and done["error"]["field"] == "source_job"
    assert pre["id"] in done["error"]["message"] and "gone" in done["error"]["message"]


def test_progress_stream_server_sent_events(client: httpx.Client, other_client: httpx.Client, live_worker) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/v1/jobs", json={**TINY, "epochs": 20, "seed": 21}).json()
    assert other_client.get(f"/v1/jobs/{job['id']}/events").status_code == 404
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=180) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "succeeded" and "running" in statuses, statuses
    fractions = [e["progress"]["fraction"] for e in events]
    assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions), fractions
