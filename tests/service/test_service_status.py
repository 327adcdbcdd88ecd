"""The service itself (issue 18 items 5 and 6) on the real stack (Postgres, Redis, a Celery
worker): ``GET /v1/status`` (owner-safe), ``GET /metrics`` in the Prometheus text format (parsed
with prometheus_client's own parser; an API key unless ``SSQL_METRICS_PUBLIC=1``; several uvicorn
processes summed in multiprocess mode), the keys routes (list, create, revoke: refused at once),
and the status and keys pages in Debian's Chromium (no console errors).

Screenshots go to a temporary folder; to update docs/screenshots/:
    SSQL_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest -q tests/service/test_service_status.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from persistence import workers
from persistence.db import utcnow
from persistence.keys import create_key
from persistence.models import Job, JobAttempt, User
from persistence.settings import Settings
from ssql_cli.stack import free_port
from tests.service.browser import ROOT
from tests.service.conftest import TINY, wait_for


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fams: dict, family: str, sample: str | None = None) -> list:
    return [s for s in fams[family].samples if sample is None or s.name == sample]


def _up_worker(client: httpx.Client, queue: str, timeout: float = 60) -> dict:
    """The session's live worker as the status route shows it (it reports every second)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = client.get("/v1/status").json()
        up = [w for w in last["workers"] if w["state"] == "up" and queue in w["queues"]]
        if up:
            return up[0]
        time.sleep(0.3)
    raise AssertionError(f"no live worker on {queue} in /v1/status: {last}")


@pytest.fixture(scope="module")
def running_job(client: httpx.Client, stack):  # type: ignore[no-untyped-def]
    """A job of the main owner that runs for a while (cancelled at the end of the module)."""
    if stack.worker is None or stack.worker.poll() is not None:  # an earlier test killed it
        stack.start_worker()
    job = client.post("/v1/jobs", json={**TINY, "epochs": 400, "name": "long <b>run</b>"}).json()
    yield job["id"]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for(client, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))


def _wait_running(client: httpx.Client, job_id: str) -> dict:
    return wait_for(client, job_id, lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) > 0, timeout=120)


def test_status_shows_queues_workers_and_running_attempts_owner_safe(client, other_client, queue_name, running_job, settings) -> None:  # type: ignore[no-untyped-def]
    _wait_running(client, running_job)
    mine = client.get("/v1/status")
    assert mine.status_code == 200, mine.text
    s = mine.json()
    queue = next(q for q in s["queues"] if q["name"] == queue_name)
    assert queue["queued"] >= 0 and queue["broker_messages"] is not None  # Redis is readable
    worker = _up_worker(client, queue_name)
    assert worker["host"] == socket.gethostname() and worker["device"].startswith("cpu: ")  # SSQL_DEVICE=cpu
    assert worker["heartbeat_age_s"] < 15 and worker["concurrency"] == 1
    assert {"yours": True, "id": running_job, "kind": "pretrain", "name": "long <b>run</b>"} in worker["jobs"]
    run = next(r for r in s["running"] if r["job_id"] == running_job)
    assert run["attempt"] >= 1 and run["worker"].startswith(socket.gethostname() + ":") and run["progress"]["step"] > 0
    assert s["jobs"]["yours"]["running"] >= 1 and s["jobs"]["all"]["running"] >= s["jobs"]["yours"]["running"]

    theirs = other_client.get("/v1/status").json()  # another owner: counts only, no id, kind or name of ours
    assert running_job not in str(theirs) and "long <b>run</b>" not in str(theirs)
    assert theirs["running_others"] >= 1 and all(r["job_id"] != running_job for r in theirs["running"])
    w = next(w for w in theirs["workers"] if w["name"] == worker["name"])
    assert {"yours": False, "id": None, "kind": None, "name": None} in w["jobs"]
    assert theirs["jobs"]["all"]["running"] >= 1 and theirs["jobs"]["yours"]["running"] == 0

    assert httpx.get(f"{client.base_url}/v1/status").status_code == 401
    assert client.get("/v1/status", params={"failures_hours": 0}).status_code == 422


def test_status_lists_recent_failures_and_stopped_workers(client, other_client, sessions) -> None:  # type: ignore[no-untyped-def]
    """Failed attempts as the worker records them (rows written as job_store does, on jobs that
    no worker runs), and a worker's clean stop (persistence.workers, as worker/presence.py calls it)."""
    now, ids = utcnow(), {}
    with sessions() as s:
        for owner in ("alice", "mallory"):
            jid = ids[owner] = str(uuid.uuid4())
            s.add(Job(id=jid, owner_id=s.scalar(select(User.id).where(User.name == owner)), kind="pretrain", status="failed",
                      spec={"kind": "pretrain", "config": {}}, attempts=2, max_attempts=2, cancel_requested=False,
                      name="fails", created_at=now, updated_at=now, finished_at=now,
                      error={"code": "training_diverged", "message": "loss is nan at step 3 (/srv/ssql/x)"}))
            s.flush()
            s.add(JobAttempt(job_id=jid, attempt=1, worker="elsewhere:1", pid=1, started_at=now - timedelta(minutes=3),
                             ended_at=now - timedelta(minutes=2), outcome="lost"))
            s.add(JobAttempt(job_id=jid, attempt=2, worker="elsewhere:2", pid=2, started_at=now - timedelta(minutes=2),
                             ended_at=now - timedelta(minutes=1), outcome="failed"))
        s.commit()
        workers.report(s, name="gone@elsewhere", host="elsewhere", pid=7, queues=["gpu"], device="cpu: test", concurrency=1,
                       processes=[], started_at=now)
        workers.mark_stopped(s, "gone@elsewhere")
    mine, theirs = ids["alice"], ids["mallory"]
    body = client.get("/v1/status").json()
    fails = [f for f in body["failures"] if f["job_id"] == mine]
    assert [f["outcome"] for f in fails] == ["failed", "lost"]  # newest first
    assert fails[0]["name"] == "fails" and fails[0]["job_status"] == "failed" and fails[0]["error"]["code"] == "training_diverged"
    assert "/srv/ssql" not in fails[0]["error"]["message"]  # no server path (decision 014)
    assert theirs not in str(body) and body["failures_others"] >= 2
    gone = next(w for w in body["workers"] if w["name"] == "gone@elsewhere")
    assert gone["state"] == "stopped" and gone["jobs"] == []
    assert client.get("/v1/status", params={"failures_hours": 1e-6}).json()["failures"] == []
    assert mine not in str(other_client.get("/v1/status").json())


def test_worker_state_rule() -> None:
    s = Settings(heartbeat_seconds=5)
    now = utcnow()
    assert workers.worker_state(None, now - timedelta(seconds=14), s, now) == "up"
    assert workers.worker_state(None, now - timedelta(seconds=16), s, now) == "lost"  # 3 periods, at least 15 s
    assert workers.worker_state(now, now - timedelta(hours=1), s, now) == "stopped"


def test_worker_device_from_nvidia_smi(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The worker names its GPUs from nvidia-smi's CSV (no CUDA in the forking process). No GPU
    here: a stand-in ``nvidia-smi`` on PATH prints what the real one prints for two H100s."""
    from worker.presence import describe_device

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, NVIDIA H100 80GB HBM3\\n1, NVIDIA H100 80GB HBM3\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert describe_device(Settings(device="auto")) == "2x NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert describe_device(Settings(device="auto")) == "NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: the CPU
    assert describe_device(Settings(device="auto")).startswith("cpu: ")
    assert describe_device(Settings(device="cpu")).startswith("cpu: ")


def test_metrics_prometheus_format_needs_a_key(client, stack, sessions, queue_name, running_job) -> None:  # type: ignore[no-untyped-def]
    _wait_running(client, running_job)
    client.get(f"/v1/jobs/{running_job}")
    client.head(f"/v1/jobs/{running_job}")
    client.get("/v1/no-such-route-" + running_job)
    assert httpx.get(f"{stack.url}/metrics").status_code == 401  # SSQL_METRICS_PUBLIC unset
    assert httpx.get(f"{stack.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert running_job not in r.text  # route templates, never raw paths
    fams = _families(r.text)
    reqs = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value for s in _samples(fams, "ssql_http_requests", "ssql_http_requests_total")}
    assert reqs[("GET", "/v1/jobs/{job_id}", "200")] >= 1 and reqs[("HEAD", "/v1/jobs/{job_id}", "200")] >= 1
    assert reqs[("GET", "<unmatched>", "404")] >= 1
    assert fams["ssql_http_request_duration_seconds"].type == "histogram"
    buckets = [s for s in _samples(fams, "ssql_http_request_duration_seconds", "ssql_http_request_duration_seconds_bucket")
               if s.labels["route"] == "/v1/jobs/{job_id}" and s.labels["method"] == "GET"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)  # cumulative
    jobs = {(s.labels["state"], s.labels["kind"]): s.value for s in _samples(fams, "ssql_jobs")}
    assert jobs[("running", "pretrain")] >= 1
    assert {s.labels["queue"]: s.value for s in _samples(fams, "ssql_queue_depth")}[queue_name] >= 0
    assert queue_name in {s.labels["queue"] for s in _samples(fams, "ssql_queue_broker_messages")}
    assert _samples(fams, "ssql_attempts_running")[0].value >= 1
    outcomes = {s.labels["outcome"]: s.value for s in _samples(fams, "ssql_job_attempts_ended", "ssql_job_attempts_ended_total")}
    assert fams["ssql_job_attempts_ended"].type == "counter"
    with sessions() as s:
        ended = dict(s.execute(select(JobAttempt.outcome, func.count()).where(JobAttempt.ended_at.is_not(None))
                               .group_by(JobAttempt.outcome)).all())
    assert {k: int(v) for k, v in outcomes.items()} == ended
    worker = _up_worker(client, queue_name)
    assert {s.labels["worker"]: s.value for s in _samples(fams, "ssql_worker_up")}.get(worker["name"]) == 1
    beat = next(s for s in _samples(fams, "ssql_worker_last_heartbeat_timestamp_seconds") if s.labels["worker"] == worker["name"])
    assert abs(beat.value - time.time()) < 60 and beat.labels["device"].startswith("cpu: ")
    # every series the Grafana dashboard (docs/grafana/) queries is one this scrape has
    exprs = [t["expr"] for p in json.loads((ROOT / "docs" / "grafana" / "ssql-service.json").read_text())["panels"] for t in p["targets"]]
    queried = {re.sub(r"_(total|bucket)$", "", n) for e in exprs for n in re.findall(r"ssql_\w+", e)}
    assert exprs and queried <= set(fams), queried - set(fams)


def test_metrics_public_and_summed_over_uvicorn_workers(service_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``SSQL_METRICS_PUBLIC=1``: no key needed. Two uvicorn processes in multiprocess mode: every
    scrape, whichever process answers, counts the requests both served."""
    mp = tmp_path / "prom"
    mp.mkdir()
    port = free_port()
    env = {**service_env, "SSQL_METRICS_PUBLIC": "1", "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "2", "--log-level", "warning"], env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "API did not start"
            time.sleep(0.3)
        # both processes up: each has answered /readyz at least once (new connection per request)
        while len(list(mp.glob("counter_*.db"))) < 2:
            assert time.monotonic() < deadline, "the second process never answered"
            [httpx.get(url + "/readyz") for _ in range(4)]
        before = {s.labels["status"]: s.value for s in _samples(_families(httpx.get(url + "/metrics").text), "ssql_http_requests", "ssql_http_requests_total")
                  if s.labels["route"] == "/healthz"}
        sent = 60
        threads = [threading.Thread(target=lambda: [httpx.get(url + "/healthz") for _ in range(sent // 6)]) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for _ in range(4):  # any process answering the scrape sums every process's counts
            fams = _families(httpx.get(url + "/metrics").text)
            after = {s.labels["status"]: s.value for s in _samples(fams, "ssql_http_requests", "ssql_http_requests_total")
                     if s.labels["route"] == "/healthz"}
            assert after["200"] - before.get("200", 0) == sent
            assert "ssql_jobs" in fams and "ssql_queue_depth" in fams
        assert len(list(mp.glob("counter_*.db"))) == 2
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


# -- keys ------------------------------------------------------------------------------------------
def test_keys_list_create_revoke_at_once(client, other_client, stack, api_key) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/v1/keys", json={"label": "ci runner"})
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    new = r.json()
    assert new["key"].startswith("ssql_") and new["key"].startswith(new["prefix"]) and new["label"] == "ci runner"
    listed = client.get("/v1/keys").json()["items"]
    assert listed[0]["id"] == new["id"] and "key" not in listed[0] and "key_hash" not in listed[0]
    assert [k["current"] for k in listed if api_key.startswith(k["prefix"])] == [True] and not listed[0]["current"]
    assert new["key"] not in client.get("/v1/keys").text
    assert new["id"] not in [k["id"] for k in other_client.get("/v1/keys").json()["items"]]
    as_new = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {new['key']}"}, timeout=30)
    assert as_new.get("/v1/jobs").status_code == 200  # cached by the API now
    assert other_client.delete(f"/v1/keys/{new['id']}").status_code == 404  # not theirs
    assert as_new.get("/v1/jobs").status_code == 200
    assert client.delete(f"/v1/keys/{new['id']}").status_code == 204
    assert as_new.get("/v1/jobs").status_code == 401  # at once, on the API that revoked it
    assert client.delete(f"/v1/keys/{new['id']}").status_code == 204  # already revoked: unchanged
    row = next(k for k in client.get("/v1/keys").json()["items"] if k["id"] == new["id"])
    assert row["revoked_at"] is not None
    as_new.close()


@pytest.mark.parametrize(("method", "path", "body", "loc"), [
    ("POST", "/v1/keys", {"label": "a\nb"}, ["body", "label"]),
    ("POST", "/v1/keys", {"label": "x" * 101}, ["body", "label"]),
    ("POST", "/v1/keys", {"name": "x"}, ["body", "name"]),
    ("DELETE", "/v1/keys/0", None, ["path", "key_id"]),
    ("DELETE", "/v1/keys/99999999999", None, ["path", "key_id"]),
    ("DELETE", "/v1/keys/abc", None, ["path", "key_id"]),
])  # fmt: skip
def test_keys_bad_input_is_422_naming_the_field(client, method, path, body, loc) -> None:  # type: ignore[no-untyped-def]
    r = client.request(method, path, json=body)
    assert r.status_code == 422, r.text
    assert any(d["loc"] == loc for d in r.json()["detail"]), r.json()


def test_keys_an_owner_holds_at_most_100(stack, sessions) -> None:  # type: ignore[no-untyped-def]
    from persistence.api_store import MAX_ACTIVE_KEYS

    with sessions() as s:
        key = create_key(s, "hoarder")
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for _ in range(MAX_ACTIVE_KEYS - 1):
            assert c.post("/v1/keys", json={}).status_code == 201
        assert c.post("/v1/keys", json={}).status_code == 409
        first = c.get("/v1/keys").json()["items"][0]
        assert c.delete(f"/v1/keys/{first['id']}").status_code == 204
        assert c.post("/v1/keys", json={"label": None}).status_code == 201


def test_client_and_cli(stack, api_key, queue_name, capsys) -> None:  # type: ignore[no-untyped-def]
    from ssql_cli.main import main
    from ssql_client import ApiError, Client

    with Client(stack.url, api_key) as c:
        assert queue_name in [q["name"] for q in c.service_status()["queues"]]
        new = c.create_key("script")
        with Client(stack.url, new["key"]) as as_new:
            assert [k["id"] for k in as_new.keys() if k["current"]] == [new["id"]]
            c.revoke_key(new["id"])
            with pytest.raises(ApiError) as refused:
                as_new.keys()
            assert refused.value.status == 401
    _up_worker(httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {api_key}"}), queue_name)
    assert main(["service", "--url", stack.url, "--key", api_key]) == 0
    out = capsys.readouterr().out
    assert f"queue {queue_name}:" in out and "[up]" in out and "failed attempts in the last 24 h" in out


# -- the pages in Chromium (fixtures browser and shots: conftest.py) ----------------------------------
class Page:
    """A browser context signed in with ``key``; collects console errors and page errors."""

    def __init__(self, browser, url: str, key: str) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "/")
        self.page.fill("#api-key", key)
        self.page.click("#signin-form button[type=submit]")
        self.page.wait_for_selector("#jobs-table")

    def close(self) -> None:
        self.context.close()


def test_status_page_in_chromium(stack, client, other_key, queue_name, running_job, browser, shots) -> None:  # type: ignore[no-untyped-def]
    _wait_running(client, running_job)
    worker = _up_worker(client, queue_name)
    me = Page(browser, stack.url, client.headers["authorization"].split()[1])
    page = me.page
    page.click("#nav-status")
    page.wait_for_selector(f'#workers-table tr[data-worker="{worker["name"]}"][data-state="up"]')
    row = page.locator(f'#workers-table tr[data-worker="{worker["name"]}"]')
    assert row.locator(f'a[href="#/job/{running_job}"]').count() == 1  # the current job, linked
    assert "long <b>run</b>" in row.inner_text() and page.locator("#workers-table b").count() == 0  # text, not markup
    assert page.locator(f'#running-table tr[data-job-id="{running_job}"]').count() == 1
    assert page.locator(f'#queues-table tr[data-queue="{queue_name}"]').count() == 1
    page.screenshot(path=str(shots / "status.png"), full_page=True)
    stamp = page.inner_text("#status-time")
    them = Page(browser, stack.url, other_key)  # another owner: the worker is busy with "another owner's job"
    them.page.goto(stack.url + "/#/status")
    them.page.wait_for_selector(f'#workers-table tr[data-worker="{worker["name"]}"] .wjob')
    text = them.page.inner_text("main")
    assert "another owner's job" in text and running_job[:8] not in text and "long <b>run</b>" not in text
    assert "running attempt" in text and "of other owners" in text
    page.wait_for_function("(s) => document.querySelector('#status-time').textContent !== s", arg=stamp)  # refreshed
    assert page.locator(f'#workers-table tr[data-worker="{worker["name"]}"]').count() == 1
    assert me.errors == [] and them.errors == []
    me.close()
    them.close()


def test_keys_page_create_and_revoke_in_chromium(stack, sessions, browser, shots) -> None:  # type: ignore[no-untyped-def]
    with sessions() as s:
        key = create_key(s, "kim")
    me = Page(browser, stack.url, key)
    page = me.page
    page.click("#nav-keys")
    page.wait_for_selector("#keys-table tr[data-state=active]")
    assert page.inner_text("#keys-table tbody").count("this browser") == 1
    page.fill("#key-label", "<img src=x onerror=alert(1)> laptop")
    page.click("#key-create")
    page.wait_for_selector("#key-secret")
    secret = page.input_value("#key-secret")
    assert secret.startswith("ssql_")
    page.wait_for_selector("#keys-table tbody tr:nth-child(2)")
    assert "<img src=x onerror=alert(1)> laptop" in page.inner_text("#keys-table") and page.locator("#keys-table img").count() == 0
    page.screenshot(path=str(shots / "keys.png"), full_page=True)
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {secret}"}) as as_new:
        assert as_new.get("/v1/jobs").status_code == 200
        new_id = next(k["id"] for k in as_new.get("/v1/keys").json()["items"] if k["current"])
        button = page.locator(f'#keys-table button[data-key-id="{new_id}"]')
        button.click()  # arms
        assert button.inner_text() == "Confirm revoke"
        button.click()
        page.wait_for_selector(f'#keys-table tr[data-key-id="{new_id}"][data-state=revoked]')
        assert as_new.get("/v1/jobs").status_code == 401  # refused at once
    page.reload()  # the key is kept per browser: still signed in after a reload
    page.wait_for_selector("#keys-table")
    own = page.locator("#keys-table tr[data-state=active] button")
    own.click()
    assert own.inner_text() == "Revoke and sign out"
    own.click()
    page.wait_for_selector("#signin-form")
    assert page.evaluate("localStorage.getItem('ssql.apiKey')") is None
    assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert me.errors == [], me.errors
    me.close()
