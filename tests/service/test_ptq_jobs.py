"""Reconstruction PTQ (``ptq``) through the service: an eval job with AdaRound, its classifier
files, an export job with BRECQ, and the 422s of bad settings (real Postgres, Redis, Celery)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from tests.service.conftest import wait_for

DONE = ("succeeded", "failed", "cancelled")


def _loc(resp: httpx.Response) -> list:
    assert resp.status_code == 422, resp.text
    return resp.json()["detail"][0]["loc"]


@pytest.mark.parametrize(("patch", "loc"), [
    ({"ptq": "gptq"}, ["body", "ptq"]),
    ({"ptq": "adaround", "ptq_iters": 0}, ["body", "ptq_iters"]),
    ({"ptq": "adaround", "ptq_images": 100_000}, ["body", "ptq_images"]),
    ({"ptq": "adaround", "brecq_learn_act": True}, ["body", "brecq_learn_act"]),
    ({"ptq": "brecq", "brecq_learn_act": "yes"}, ["body", "brecq_learn_act"]),
])
def test_bad_eval_ptq_settings_are_422_naming_the_field(client: httpx.Client, finished_pretrain: str, patch: dict, loc: list) -> None:
    assert _loc(client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, **patch})) == loc


@pytest.mark.parametrize(("patch", "loc"), [
    ({"ptq": "gptq"}, ["body", "ptq"]),
    ({"ptq": "adaround", "ptq_iters": 10**6}, ["body", "ptq_iters"]),
    ({"ptq": "brecq", "ptq_images": 0}, ["body", "ptq_images"]),
])
def test_bad_export_ptq_settings_are_422_naming_the_field(client: httpx.Client, finished_pretrain: str, patch: dict, loc: list) -> None:
    assert _loc(client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": ["4w4a"], **patch})) == loc


def test_adaround_eval_job_and_brecq_export_job(client: httpx.Client, finished_pretrain: str, live_worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ssql_core.export import load_quantized

    body = {"kind": "eval", "source_job": finished_pretrain, "bits": ["fp", "2w4a"], "epochs": 1, "batch_size": 32,
            "calib_images": 16, "max_samples": 64, "ptq": "adaround", "ptq_images": 16, "ptq_iters": 5}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["config"]["ptq"] == "adaround"
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert job["status"] == "succeeded", job
    rows = client.get(f"/v1/jobs/{job['id']}/results").json()["rows"]
    assert [(r["bits"], r["ptq"]) for r in rows] == [("fp", "adaround"), ("2w4a", "adaround")]
    assert rows[1]["ptq_iters"] == 5 and rows[1]["ptq_images"] == 16
    ckpt = next(c for c in client.get(f"/v1/jobs/{job['id']}/checkpoints").json() if c["bits"] == "2w4a")
    dest = tmp_path / "c.safetensors"
    dest.write_bytes(client.get(ckpt["url"]).content)
    model = load_quantized(dest)
    assert model.manifest["ptq"]["method"] == "adaround" and model.manifest["ptq"]["source"] == "evaluation"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # the classifier is the evaluated model: another ptq cannot be exported from the eval job
    assert _loc(client.post(f"/v1/jobs/{job['id']}/exports", json={"bits": ["2w4a"], "ptq": "brecq"})) == ["body", "ptq"]
    ex = client.post(f"/v1/jobs/{finished_pretrain}/exports",
                     json={"bits": ["3w4a"], "formats": ["safetensors", "onnx"], "ptq": "brecq", "ptq_images": 16, "ptq_iters": 5})
    assert ex.status_code in (201, 202), ex.text
    ex_job = wait_for(client, ex.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert ex_job["status"] == "succeeded", ex_job
    assert ex_job["spec"]["config"]["ptq"] == "brecq"
