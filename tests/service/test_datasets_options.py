"""Fashion-MNIST's real files, the reference preset, calibration methods and the BN probe through
the service (real Postgres, Redis and Celery worker), and their 422s."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.service.conftest import TINY, wait_for

REAL = Path("/usr/share/datasets/fashion-mnist")
DONE = ("succeeded", "failed", "cancelled")


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_reference_preset_calibrations_and_bn_probe(client: httpx.Client, live_worker) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={**TINY, "dataset": "fashion_mnist", "preset": "reference", "export_bits": ["4w4a"]})
    assert resp.status_code == 201, resp.text
    config = resp.json()["spec"]["config"]
    assert (config["preset"], config["weight_scale_grad"], config["rounding"], config["init"]) == ("reference", "attached", "divide", "pytorch")
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert job["status"] == "succeeded", job
    body = {"kind": "eval", "source_job": job["id"], "bits": ["fp", "4w4a"], "epochs": 2, "batch_size": 64, "calib_images": 32,
            "max_samples": 128, "calibration": "mse", "calib_weights": "quantized", "probe": "bn", "lr": 0.1}
    ev = client.post("/v1/jobs", json=body)
    assert ev.status_code == 201, ev.text
    ev_job = wait_for(client, ev.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert ev_job["status"] == "succeeded", ev_job
    rows = client.get(f"/v1/jobs/{ev_job['id']}/results").json()["rows"]
    assert [r["bits"] for r in rows] == ["fp", "4w4a"]
    for r in rows:
        assert (r["dataset"], r["calibration"], r["calib_weights"], r["probe"]) == ("fashion_mnist", "mse", "quantized", "bn")
        assert r["test_images"] == 10000 and 0 <= r["top1"] <= 100
        # rounding and normalization default to the checkpoint's own (the reference preset's)
        assert (r["rounding"], r["normalization"], r["interpolation"], r["preset"]) == ("divide", "reference", "bilinear", None)
    # the reference's evaluation as a preset, one field overridden: both show in the rows
    ref = client.post("/v1/jobs", json={"kind": "eval", "source_job": job["id"], "bits": ["4w4a"], "epochs": 2, "batch_size": 64,
                                        "max_samples": 128, "preset": "reference", "calib_images": 16, "rounding": "reciprocal"})
    assert ref.status_code == 201, ref.text
    assert ref.json()["spec"]["config"]["interpolation"] == "bicubic"
    ref_job = wait_for(client, ref.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert ref_job["status"] == "succeeded", ref_job
    (row,) = client.get(f"/v1/jobs/{ref_job['id']}/results").json()["rows"]
    assert (row["preset"], row["calibration"], row["probe"], row["lr"], row["interpolation"], row["rounding"], row["calib_images"]) == (
        "reference", "reference", "linear", 30.0, "bicubic", "reciprocal", 16)
    ex = client.post(f"/v1/jobs/{job['id']}/exports", json={"bits": ["3w3a"], "calibration": "percentile", "calib_percentile": 99.9})
    assert ex.status_code in (201, 202), ex.text
    ex_job = wait_for(client, ex.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert ex_job["status"] == "succeeded", ex_job


@pytest.mark.parametrize(("patch", "loc", "needle"), [
    ({"dataset": "mnist"}, ["body", "dataset"], "IDX files were not found"),
    ({"preset": "paper"}, ["body", "preset"], ""),
    ({"rounding": "floor"}, ["body", "rounding"], ""),
    ({"init": "xavier"}, ["body", "init"], ""),
    ({"normalization": "imagenet"}, ["body", "normalization"], ""),
    ({"drop_last": "sometimes"}, ["body", "drop_last"], ""),
    ({"lr_step": "batch"}, ["body", "lr_step"], ""),
])
def test_pretrain_422s(client: httpx.Client, patch: dict, loc: list, needle: str) -> None:
    if patch.get("dataset") == "mnist" and Path("/usr/share/datasets/mnist").exists():
        pytest.skip("MNIST files are installed on this machine")
    resp = client.post("/v1/jobs", json={**TINY, **patch})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"][0]
    assert detail["loc"] == loc and needle in detail["msg"]


@pytest.mark.parametrize(("patch", "loc"), [
    ({"calibration": "kl"}, ["body", "calibration"]),
    ({"probe": "mlp"}, ["body", "probe"]),
    ({"calib_weights": "int8"}, ["body", "calib_weights"]),
    ({"calib_percentile": 20.0}, ["body", "calib_percentile"]),
    ({"preset": "ours"}, ["body", "preset"]),
    ({"interpolation": "nearest"}, ["body", "interpolation"]),
    ({"normalization": "imagenet"}, ["body", "normalization"]),
    ({"rounding": "floor"}, ["body", "rounding"]),
])
def test_eval_422s(client: httpx.Client, finished_pretrain: str, patch: dict, loc: list) -> None:
    resp = client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, **patch})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc


def test_export_calibration_422(client: httpx.Client, finished_pretrain: str) -> None:
    resp = client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": ["4w4a"], "calibration": "kl"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "calibration"]
    resp = client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": ["4w4a"], "calib_percentile": 101})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "calib_percentile"]
