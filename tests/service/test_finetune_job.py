"""Finetune jobs through the service (real Postgres, Redis, Celery): results, the packed classifier
served for download and loading back, ONNX through the export route, and every 422."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import wait_for

DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def finetuned(client: httpx.Client, finished_pretrain: str, stack) -> dict:  # type: ignore[no-untyped-def]
    body = {"kind": "finetune", "source_job": finished_pretrain, "bits": "4w4f", "epochs": 2, "batch_size": 16,
            "max_samples": 64, "calib_images": 16, "baseline_epochs": 2, "lr": 0.05}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["config"]["bits"] == "4w4a" and resp.json()["spec"]["config"]["dataset"] == "synthetic"
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert job["status"] == "succeeded", job
    return job


def test_finetune_results_and_packed_classifier(client: httpx.Client, finetuned: dict, tmp_path: Path) -> None:
    rows = client.get(f"/v1/jobs/{finetuned['id']}/results").json()["rows"]
    (row,) = rows
    assert row["protocol"] == "finetune" and row["bits"] == "4w4a" and row["quantizer"] == "psq"
    assert 0 <= row["top1"] <= 100 and "ptq_linear_top1" in row and [c["epoch"] for c in row["curve"]] == [1, 2]
    assert row["head_init"] == "probe" and abs(row["start_top1"] - row["ptq_linear_top1"]) < 1e-6  # starts at its baseline
    files = {(c["bits"], c["format"]): c for c in client.get(f"/v1/jobs/{finetuned['id']}/checkpoints").json()}
    assert ("4w4a", "safetensors") in files and ("4w4a", "torch") in files
    resp = client.get(f"/v1/jobs/{finetuned['id']}/checkpoints/4w4a", params={"format": "safetensors"})
    assert resp.status_code == 200 and hashlib.sha256(resp.content).hexdigest() == files[("4w4a", "safetensors")]["sha256"]
    (tmp_path / "c.safetensors").write_bytes(resp.content)
    from ssql_core.export import load_quantized

    model = load_quantized(tmp_path / "c.safetensors")
    assert model.manifest["source"]["kind"] == "finetuned" and str(model.bits) == "4w4a"


def test_onnx_through_the_export_route(client: httpx.Client, finetuned: dict) -> None:
    resp = client.post(f"/v1/jobs/{finetuned['id']}/exports", json={"bits": ["4w4a"], "formats": ["onnx"]})
    assert resp.status_code == 202, resp.text
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in DONE, timeout=120)
    assert job["status"] == "succeeded", job.get("error")
    formats = {(c["bits"], c["format"]) for c in client.get(f"/v1/jobs/{finetuned['id']}/checkpoints").json()}
    assert ("4w4a", "onnx") in formats
    bad = client.post(f"/v1/jobs/{finetuned['id']}/exports", json={"bits": ["2w4a"]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "bits"]


@pytest.mark.parametrize(("patch", "loc"), [
    ({"bits": "9w4a"}, ["body", "bits"]),
    ({"quantizer": "int8"}, ["body", "quantizer"]),
    ({"act_ranges": "ema"}, ["body", "act_ranges"]),
    ({"epochs": 0}, ["body", "epochs"]),
    ({"dataset": "mnist"}, ["body", "dataset"]),
    ({"checkpoint": "/etc/passwd"}, ["body", "checkpoint"]),
    ({"head_init": "zeros"}, ["body", "head_init"]),
    ({"head_init": "probe", "baseline_epochs": 0}, ["body", "head_init"]),
])
def test_finetune_422s(client: httpx.Client, finished_pretrain: str, patch: dict, loc: list) -> None:
    if patch.get("dataset") == "mnist" and Path("/usr/share/datasets/mnist").exists():
        pytest.skip("MNIST files are installed on this machine")
    resp = client.post("/v1/jobs", json={"kind": "finetune", "source_job": finished_pretrain, **patch})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc


def test_finetune_source_must_be_a_succeeded_pretrain(client: httpx.Client, finetuned: dict) -> None:
    for source in (finetuned["id"], "00000000-0000-0000-0000-000000000000"):
        resp = client.post("/v1/jobs", json={"kind": "finetune", "source_job": source})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "source_job"]
