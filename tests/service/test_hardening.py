"""Hostile and broken input against the real service (found by fuzzing): never a 500, never a job
that no worker can run, and a failed job always names its real cause (docs/decisions/008)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import select

from api.specs import pretrain_spec
from persistence import job_store
from persistence.db import utcnow
from persistence.models import Artifact, Job, JobAttempt, User
from tests.service.conftest import TINY, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


def _post_raw(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST a body httpx's ``json=`` refuses to write: NaN / Infinity tokens, lone surrogates
    (written as ``\\ud800`` escapes, exactly what a hostile client sends)."""
    return client.post(path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})


def _loc(resp: httpx.Response) -> list:
    assert resp.status_code == 422, (resp.status_code, resp.text)
    return resp.json()["detail"][0]["loc"]


def _owner(sessions) -> int:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return int(s.scalar(select(User.id).where(User.name == "alice")))


# -- (3) 500s on bad input --------------------------------------------------------------------

@pytest.mark.parametrize("value", [2**63, 2**64, 10**30])
def test_huge_offset_and_after_are_422(client: httpx.Client, finished_pretrain: str, value: int) -> None:
    assert _loc(client.get("/v1/jobs", params={"offset": value})) == ["query", "offset"]
    assert _loc(client.get(f"/v1/jobs/{finished_pretrain}/metrics", params={"after": value})) == ["query", "after"]
    # the largest BIGINT still works
    assert client.get("/v1/jobs", params={"offset": 2**63 - 1}).json()["items"] == []
    assert client.get(f"/v1/jobs/{finished_pretrain}/metrics", params={"after": 2**63 - 1}).json()["items"] == []


@pytest.mark.parametrize("job_id", ["abc%00def", "%00", "5f0c1a2e-7d3b-4c1e-9a8f-2b6d4e0c9a17%00", "x" * 5000, "%C3%A9t%C3%A9"])
def test_malformed_job_id_is_404_on_every_route(client: httpx.Client, job_id: str) -> None:
    for method, path, body in [
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{job_id}/events", None),
        ("POST", f"/v1/jobs/{job_id}/cancel", None),
        ("GET", f"/v1/jobs/{job_id}/metrics", None),
        ("GET", f"/v1/jobs/{job_id}/results", None),
        ("GET", f"/v1/jobs/{job_id}/checkpoints", None),
        ("GET", f"/v1/jobs/{job_id}/checkpoints/fp", None),
        ("POST", f"/v1/jobs/{job_id}/exports", {"bits": ["4w4a"]}),
    ]:
        resp = client.request(method, path, json=body)
        assert resp.status_code == 404, (method, path[:80], resp.status_code, resp.text[:300])


@pytest.mark.parametrize("source_job", ["abc\x00def", "\x00", "\ud800", "a\udfffb", "x" * 5000])
@pytest.mark.parametrize("kind", ["eval", "distill"])
def test_malformed_source_job_is_422_on_source_job(client: httpx.Client, kind: str, source_job: str) -> None:
    resp = _post_raw(client, "/v1/jobs", {"kind": kind, "source_job": source_job})
    assert _loc(resp) == ["body", "source_job"]


def test_nul_and_lone_surrogates_anywhere_in_a_body_are_422(client: httpx.Client) -> None:
    assert _loc(_post_raw(client, "/v1/jobs", {**TINY, "epochs": 1, "dataset": "digits\x00"})) == ["body", "dataset"]
    assert _loc(_post_raw(client, "/v1/jobs", {**TINY, "epochs": 1, "stem": "\ud800"})) == ["body", "stem"]
    assert _loc(_post_raw(client, "/v1/jobs", {**TINY, "epochs": 1, "method_options": {"x\ud800": 1}}))[:2] == [
        "body", "method_options"]
    resp = _post_raw(client, "/v1/jobs", {"kind": "\ud800"})  # echoed in FastAPI's own message
    assert resp.status_code == 422, resp.text
    resp = _post_raw(client, "/v1/jobs", {**TINY, "epochs": 1, "\ud800": 1})  # an unknown (extra) field
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][0] == "body", resp.text
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 1}, headers={"Idempotency-Key": "k\u00ff\u00e9".encode("latin-1")})
    assert resp.status_code == 201, resp.text
    client.post(f"/v1/jobs/{resp.json()['id']}/cancel")


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"method": "byol", "ema": math.nan}, ["body", "ema"]),
        ({"method": "byol", "ema": math.inf}, ["body", "ema"]),
        ({"method": "mocov2", "temperature": math.nan}, ["body", "temperature"]),
        ({"method": "mocov2", "temperature": -math.inf}, ["body", "temperature"]),
        ({"method": "mocov2", "key_momentum": math.nan}, ["body", "key_momentum"]),
        ({"method": "mocov2", "method_options": {"key_momentum": math.inf}}, ["body", "method_options", "key_momentum"]),
        ({"lr": math.nan}, ["body", "lr"]),
        ({"width": math.inf}, ["body", "width"]),
    ],
)
def test_non_finite_pretrain_numbers_are_422(client: httpx.Client, patch: dict, loc: list) -> None:
    assert _loc(_post_raw(client, "/v1/jobs", {**TINY, "epochs": 1, **patch})) == loc


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"weight_decay": math.nan}, ["body", "weight_decay"]),
        ({"weight_decay": math.inf}, ["body", "weight_decay"]),
        ({"momentum": math.nan}, ["body", "momentum"]),
        ({"momentum": -math.inf}, ["body", "momentum"]),
        ({"lr_milestones": [0.5, math.nan]}, ["body", "lr_milestones", 1]),
        ({"lr_milestones": [math.inf]}, ["body", "lr_milestones", 0]),
    ],
)
def test_non_finite_eval_numbers_are_422(client: httpx.Client, finished_pretrain: str, patch: dict, loc: list) -> None:
    body = {"kind": "eval", "source_job": finished_pretrain, "bits": ["fp"], "epochs": 1, **patch}
    assert _loc(_post_raw(client, "/v1/jobs", body)) == loc


# -- (4) values no worker can run; bools are not numbers ---------------------------------------

@pytest.mark.parametrize(
    ("patch", "loc", "words"),
    [
        ({"proj_dim": 2**64}, ["body", "proj_dim"], "at most"),
        ({"method": "mocov2", "queue_size": 2**40}, ["body", "queue_size"], "at most"),
        ({"method": "mocov2", "queue_size": 2**20, "proj_dim": 1024}, ["body", "queue_size"], "queue_size x proj_dim"),
        ({"method": "mocov2", "proj_dim": 1.5}, ["body", "proj_dim"], "integer"),
        ({"method": "mocov2", "temperature": 0}, ["body", "temperature"], "between"),
        ({"method": "byol", "ema": 2}, ["body", "ema"], "at most 1"),
        ({"method": "byol", "method_options": {"proj_hidden": 10**9}}, ["body", "method_options", "proj_hidden"], "at most"),
        ({"proj_dim": True}, ["body", "proj_dim"], "integer"),
    ],
)
def test_out_of_range_method_options_are_422(client: httpx.Client, patch: dict, loc: list, words: str) -> None:
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 1, **patch})
    assert _loc(resp) == loc
    assert words in resp.json()["detail"][0]["msg"], resp.text


@pytest.mark.parametrize("field", ["width", "lr", "epochs", "batch_size", "seed", "max_samples", "momentum"])
@pytest.mark.parametrize("value", [True, False])
def test_bools_are_not_numbers(client: httpx.Client, field: str, value: bool) -> None:
    assert _loc(client.post("/v1/jobs", json={**TINY, "epochs": 1, field: value})) == ["body", field]


def test_numbers_are_strict_but_an_int_is_a_number(client: httpx.Client) -> None:
    assert _loc(client.post("/v1/jobs", json={**TINY, "epochs": "2"})) == ["body", "epochs"]
    assert _loc(client.post("/v1/jobs", json={**TINY, "epochs": 2.5})) == ["body", "epochs"]
    assert _loc(client.post("/v1/jobs", json={**TINY, "lr": "0.05"})) == ["body", "lr"]
    assert _loc(client.post("/v1/jobs", json={**TINY, "amp": 1})) == ["body", "amp"]
    assert _loc(client.post("/v1/jobs", json={"kind": "eval", "source_job": "x", "knn_t": True})) == ["body", "knn_t"]
    assert _loc(client.post("/v1/jobs", json={"kind": "distill", "source_job": "x", "temperature": False})) == [
        "body", "temperature"]
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 1, "lr": 1, "momentum": 0, "seed": 31})
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["config"]["lr"] == 1.0
    client.post(f"/v1/jobs/{resp.json()['id']}/cancel")


def _insert_job(sessions, spec: dict, kind: str = "pretrain", source: str | None = None) -> str:  # type: ignore[no-untyped-def]
    """A queued job, unpublished: the worker's reconciler publishes it within a second."""
    job_id = str(uuid.uuid4())
    owner = _owner(sessions)
    with sessions() as s:
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner, kind=kind, status="queued", spec=spec, source_job_id=source, attempts=0,
                  max_attempts=3, cancel_requested=False, created_at=now, updated_at=now, published_at=None))  # fmt: skip
        s.commit()
    return job_id


def test_config_error_inside_the_runner_fails_at_once(client: httpx.Client, settings, sessions, live_worker) -> None:  # type: ignore[no-untyped-def]
    """A job queued before the limits existed (or written by anything but the API) whose config
    the runner rejects: one attempt, code invalid_config naming the option, no retries."""
    spec = pretrain_spec({**TINY, "method": "mocov2", "epochs": 1}, settings)
    spec["config"]["method_options"] = {"queue_size": 2**40}
    job_id = _insert_job(sessions, spec)
    done = wait_for(client, job_id, lambda j: j["status"] in TERMINAL, timeout=120)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"]["code"] == "invalid_config", done["error"]
    assert done["error"]["field"] == "method_options.queue_size", done["error"]


def _finished_tiny(client: httpx.Client, seed: int) -> str:
    job = client.post("/v1/jobs", json={**TINY, "epochs": 1, "seed": seed}).json()
    job = wait_for(client, job["id"], lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    return job["id"]


def _reregister(sessions, job_id: str, path) -> None:  # type: ignore[no-untyped-def]
    """Make the registered digest of ``last.pt`` match the file as changed by the test, so the job
    gets past the input check (docs/decisions/011) and meets the damaged file itself."""
    import hashlib

    with sessions() as s:
        row = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.format == "input", Artifact.bits == "last.pt"))
        assert row is not None
        row.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        s.commit()


def test_truncated_checkpoint_fails_at_once_as_corrupt_checkpoint(client: httpx.Client, settings, live_worker, sessions) -> None:  # type: ignore[no-untyped-def]
    pre = _finished_tiny(client, seed=41)
    last = settings.resolved_artifacts_dir() / "jobs" / pre / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    _reregister(sessions, pre, last)
    ev = client.post("/v1/jobs", json={"kind": "eval", "source_job": pre, "bits": ["fp"], "epochs": 1}).json()
    done = wait_for(client, ev["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"]["code"] == "corrupt_checkpoint", done["error"]
    assert done["error"]["field"] == "source_job" and "last.pt" in done["error"]["message"], done["error"]


# -- (2) NaN in progress, metrics, results ------------------------------------------------------

def test_non_finite_numbers_are_stored_as_null(client: httpx.Client, settings, sessions) -> None:  # type: ignore[no-untyped-def]
    """What the supervisor writes (heartbeat progress, metric samples, summary, results) with
    NaN / Infinity in it: stored (no DataError), and every route still answers 200."""
    job_id = str(uuid.uuid4())
    owner = _owner(sessions)
    with sessions() as s:
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner, kind="eval", status="running", spec={"config": {"epochs": 1}}, attempts=1,
                  max_attempts=3, cancel_requested=False, created_at=now, updated_at=now, published_at=now,
                  lease_until=now + timedelta(seconds=600)))  # fmt: skip
        s.flush()
        s.add(JobAttempt(job_id=job_id, attempt=1, worker="w-test", started_at=now))
        s.commit()
    nan, inf = math.nan, math.inf
    progress = {"phase": "linear", "fraction": 0.5, "epoch": 1, "epochs": 2, "step": 1, "total_steps": 2,
                "images_per_s": inf, "eta_s": nan, "loss": nan, "lr": 0.1}
    sample = {**progress, "metrics": {"z_std": nan, "nested": [inf, 1.0]}}
    with sessions() as s:
        assert job_store.heartbeat(s, job_id, 1, 600, progress) is False
        job_store.add_metrics(s, job_id, 1, [sample, {**sample, "epoch": nan, "step": None, "lr": -inf}])
    job = client.get(f"/v1/jobs/{job_id}")
    assert job.status_code == 200, job.text
    assert job.json()["progress"]["loss"] is None and job.json()["progress"]["images_per_s"] is None
    metrics = client.get(f"/v1/jobs/{job_id}/metrics")
    assert metrics.status_code == 200, metrics.text
    items = metrics.json()["items"]
    assert [m["loss"] for m in items] == [None, None] and items[0]["images_per_s"] is None and items[1]["lr"] is None
    assert items[0]["metrics"] == {"z_std": None, "nested": [None, 1.0]}
    with sessions() as s:
        assert job_store.finish(s, job_id, 1, "succeeded", summary={"final_loss": nan, "rows": 1}, progress=progress,
                                results=[{"bits": "fp", "protocol": "linear", "top1": nan, "lr": inf}])  # fmt: skip
        attempt = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        assert attempt.outcome == "succeeded" and attempt.ended_at is not None  # closed in the job's transaction
    results = client.get(f"/v1/jobs/{job_id}/results")
    assert results.status_code == 200, results.text
    assert results.json()["rows"][0]["top1"] is None and results.json()["rows"][0]["lr"] is None
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["summary"] == {"final_loss": None, "rows": 1}


def test_nan_loss_in_runner_progress_keeps_the_job_and_its_real_outcome(client: httpx.Client, settings, live_worker, sessions) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint with NaN weights: the linear probe's loss is NaN in every progress event.
    The heartbeat must go on (not be taken for a database outage) and the job must end with the
    runner's own outcome, never ``worker_lost``."""
    pre = _finished_tiny(client, seed=43)
    last = settings.resolved_artifacts_dir() / "jobs" / pre / "last.pt"
    state = torch.load(last, weights_only=True)
    for v in state["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, last)
    _reregister(sessions, pre, last)
    ev = client.post("/v1/jobs", json={"kind": "eval", "source_job": pre, "bits": ["fp"], "epochs": 3}).json()
    done = wait_for(client, ev["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert done["status"] in ("succeeded", "failed"), done
    assert (done["error"] or {}).get("code") != "worker_lost", done
    assert done["attempts"] == 1, done
    metrics = client.get(f"/v1/jobs/{ev['id']}/metrics")
    assert metrics.status_code == 200, metrics.text
    assert any(m["phase"] == "linear" and m["loss"] is None for m in metrics.json()["items"]), metrics.json()


# -- (7) request size limit ---------------------------------------------------------------------

def test_oversized_body_is_413_before_it_is_read(client: httpx.Client, finished_pretrain: str) -> None:
    big = json.dumps({**TINY, "epochs": 1, "pad": "x" * (2 << 20)})
    resp = client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert "SSQL_MAX_BODY_BYTES" in resp.json()["detail"]

    def chunks():  # no Content-Length: chunked transfer encoding, counted as it streams
        yield b'{"kind": "pretrain", "pad": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    resp = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    resp = client.post(f"/v1/jobs/{finished_pretrain}/exports", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    # under the limit, the same kind of body is an ordinary 422 naming the field
    small = json.dumps({**TINY, "epochs": 1, "pad": "x" * 1000})
    assert _loc(client.post("/v1/jobs", content=small, headers={"Content-Type": "application/json"})) == ["body", "pad"]

    def small_chunks():
        yield b'{"kind": "pretrain", "epochs": 1, '
        yield b'"padd": 1}'

    assert _loc(client.post("/v1/jobs", content=small_chunks(), headers={"Content-Type": "application/json"})) == [
        "body", "padd"]
    paths = client.get("/openapi.json").json()["paths"]
    assert "413" in paths["/v1/jobs"]["post"]["responses"]
    assert "413" in paths["/v1/jobs/{job_id}/exports"]["post"]["responses"]
