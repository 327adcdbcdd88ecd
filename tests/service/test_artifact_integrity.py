"""Item 6 of the reliability issue: every file the service registers is verified against its sha256
where it is read (real API, worker, Postgres and Redis; tiny jobs)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from persistence.models import Artifact
from tests.service.conftest import TINY, wait_for

DONE = ("succeeded", "failed", "cancelled")
EVAL = {"kind": "eval", "bits": ["fp", "4w4a"], "epochs": 1, "batch_size": 32, "calib_images": 16, "max_samples": 64}


def _finished(client: httpx.Client, job_id: str) -> dict:
    return wait_for(client, job_id, lambda j: j["status"] in DONE, timeout=180)


def _flip_middle_byte(path: Path) -> None:
    """Corrupt one byte in the middle of the file (tensor data: torch.load still reads it), keeping
    its size and its modification time."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pretrain(client: httpx.Client, stack) -> str:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 1, "seed": 61, "export_bits": ["fp"]})
    assert resp.status_code == 201, resp.text
    job = _finished(client, resp.json()["id"])
    assert job["status"] == "succeeded", job
    return job["id"]


def test_source_files_are_registered_with_their_digest(client: httpx.Client, pretrain: str, settings, sessions) -> None:  # type: ignore[no-untyped-def]
    workdir = settings.resolved_artifacts_dir() / "jobs" / pretrain
    with sessions() as s:
        rows = s.execute(select(Artifact.bits, Artifact.format, Artifact.sha256).where(Artifact.job_id == pretrain)).all()
    inputs = {r.bits: r.sha256 for r in rows if r.format == "input"}
    assert inputs == {"last.pt": _sha(workdir / "last.pt")}
    # internal files are neither listed nor downloadable
    listed = client.get(f"/v1/jobs/{pretrain}/checkpoints").json()
    assert all(c["format"] != "input" for c in listed) and ("fp", "torch") in [(c["bits"], c["format"]) for c in listed]
    assert client.get(f"/v1/jobs/{pretrain}/checkpoints/last.pt").status_code in (404, 422)  # no bit-width
    assert client.get(f"/v1/jobs/{pretrain}/checkpoints/last.pt", params={"format": "input"}).status_code == 422


def test_corrupt_last_pt_fails_eval_and_export_at_once(client: httpx.Client, stack, settings) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 1, "seed": 62, "export_bits": []})
    job = _finished(client, resp.json()["id"])
    assert job["status"] == "succeeded", job
    source = job["id"]
    last = settings.resolved_artifacts_dir() / "jobs" / source / "last.pt"
    _flip_middle_byte(last)

    resp = client.post("/v1/jobs", json={**EVAL, "source_job": source})
    assert resp.status_code == 201, resp.text
    ev = _finished(client, resp.json()["id"])
    assert ev["status"] == "failed", ev
    assert ev["error"]["code"] == "corrupt_artifact", ev["error"]
    assert ev["error"]["field"] == "source_job"
    assert "last.pt" in ev["error"]["message"]
    assert ev["attempts"] == 1  # not retried
    assert client.get(f"/v1/jobs/{ev['id']}/results").json()["rows"] == []

    resp = client.post(f"/v1/jobs/{source}/exports", json={"bits": ["4w4a"]})
    assert resp.status_code == 202, resp.text
    ex = _finished(client, resp.json()["id"])
    assert ex["status"] == "failed" and ex["error"]["code"] == "corrupt_artifact" and ex["attempts"] == 1, ex


def test_corrupt_heads_pt_fails_export_from_eval(client: httpx.Client, pretrain: str, settings) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={**EVAL, "source_job": pretrain})
    ev = _finished(client, resp.json()["id"])
    assert ev["status"] == "succeeded", ev
    _flip_middle_byte(settings.resolved_artifacts_dir() / "jobs" / ev["id"] / "heads.pt")
    resp = client.post(f"/v1/jobs/{ev['id']}/exports", json={"bits": ["4w4a"]})
    assert resp.status_code == 202, resp.text
    ex = _finished(client, resp.json()["id"])
    assert ex["status"] == "failed" and ex["error"]["code"] == "corrupt_artifact" and ex["attempts"] == 1, ex
    assert "heads.pt" in ex["error"]["message"]


def test_download_refuses_a_file_changed_on_disk(client: httpx.Client, pretrain: str, settings) -> None:  # type: ignore[no-untyped-def]
    url = f"/v1/jobs/{pretrain}/checkpoints/fp?format=torch"
    first = client.get(url)
    assert first.status_code == 200, first.text
    sha = first.headers["etag"].strip('"')
    assert hashlib.sha256(first.content).hexdigest() == sha
    assert client.get(url).status_code == 200  # cached verification

    path = settings.resolved_artifacts_dir() / "jobs" / pretrain / "backbone.pt"
    original = path.read_bytes()
    _flip_middle_byte(path)  # same size, same mtime: only the bytes (and ctime) changed
    try:
        resp = client.get(url)
        assert resp.status_code == 409, resp.text
        body = resp.json()
        assert body["code"] == "artifact_corrupt" and body["sha256"] == sha
        assert "etag" not in resp.headers
        # a conditional request is not confirmed either
        assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 409
    finally:
        path.write_bytes(original)
    again = client.get(url)
    assert again.status_code == 200 and again.content == original


def test_openapi_documents_the_corrupt_answer(stack) -> None:  # type: ignore[no-untyped-def]
    paths = httpx.get(f"{stack.url}/openapi.json").json()["paths"]
    responses = paths["/v1/jobs/{job_id}/checkpoints/{bits}"]["get"]["responses"]
    assert "409" in responses and "artifact_corrupt" in responses["409"]["description"]
