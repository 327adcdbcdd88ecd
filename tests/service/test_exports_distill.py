"""Issues 4 and 5 through HTTP: packed checkpoints after pretrain, on-demand export jobs, eval
classifiers, and SQAKD distill jobs (real worker, tiny models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.service.conftest import TINY, wait_for

DONE = ("succeeded", "failed", "cancelled")


def _finished(client: httpx.Client, job_id: str) -> dict:
    job = wait_for(client, job_id, lambda j: j["status"] in DONE)
    assert job["status"] == "succeeded", job
    return job


def _field(resp: httpx.Response) -> list:
    assert resp.status_code == 422, resp.text
    return resp.json()["detail"][0]["loc"]


def _download(client: httpx.Client, url: str, dest: Path) -> Path:
    resp = client.get(url)
    assert resp.status_code == 200, resp.text
    assert hashlib.sha256(resp.content).hexdigest() == resp.headers["etag"].strip('"')
    dest.write_bytes(resp.content)
    return dest


def _pairs(ckpts: list[dict]) -> list[tuple[str, str]]:
    return [(c["bits"], c["format"]) for c in ckpts]


@pytest.fixture(scope="module")
def small_pretrain(client: httpx.Client, stack) -> str:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 1, "seed": 41, "export_bits": ["fp", "4w4a"]})
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["export_bits"] == ["fp", "4w4a"]
    return _finished(client, resp.json()["id"])["id"]


@pytest.fixture(scope="module")
def small_eval(client: httpx.Client, small_pretrain: str) -> str:
    body = {"kind": "eval", "source_job": small_pretrain, "bits": ["fp", "4w4a"], "epochs": 1, "batch_size": 32,
            "calib_images": 16, "max_samples": 64}  # fmt: skip
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    return _finished(client, resp.json()["id"])["id"]


def test_pretrain_export_bits_then_export_job(client: httpx.Client, other_client: httpx.Client, small_pretrain: str,
                                              settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    from ssql_core.export import (
        CheckpointError,
        export_checkpoint,
        fake_quant_reference,
        load_quantized,
    )
    from ssql_core.export.calibration import run_calibration
    from ssql_core.export.onnx_graph import compare_onnx
    from ssql_core.qnn import bind_context
    from ssql_core.train import load_pretrained

    job_id = small_pretrain
    assert _pairs(client.get(f"/v1/jobs/{job_id}/checkpoints").json()) == [
        ("fp", "torch"), ("fp", "safetensors"), ("4w4a", "safetensors")]  # fmt: skip

    resp = client.post(f"/v1/jobs/{job_id}/exports", json={"bits": ["4w4a", "2w4a"], "formats": ["safetensors", "onnx"]})
    assert resp.status_code == 202, resp.text
    export = resp.json()
    assert export["kind"] == "export" and export["source_job"] == job_id
    export = _finished(client, export["id"])
    assert {(f["bits"], f["format"]) for f in export["summary"]["files"]} == {
        ("4w4a", "safetensors"), ("2w4a", "safetensors"), ("4w4a", "onnx"), ("2w4a", "onnx")}  # fmt: skip
    ckpts = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert _pairs(ckpts) == [("fp", "torch"), ("fp", "safetensors"), ("4w4a", "safetensors"),
                             ("2w4a", "safetensors"), ("4w4a", "onnx"), ("2w4a", "onnx")]  # fmt: skip
    assert client.get(f"/v1/jobs/{export['id']}/checkpoints").json() == []  # served under the source job
    assert [c["produced_by"] for c in ckpts] == [None] * 3 + [export["id"]] * 3

    # the fake-quant model the files must reproduce, and a fresh local export of the same source
    last = settings.resolved_artifacts_dir() / "jobs" / job_id / "last.pt"
    pcfg, method = load_pretrained(last)
    backbone = method.backbone.eval()
    run_calibration(backbone, bind_context(backbone), None, pcfg, torch.device("cpu"))
    x = torch.randn(8, 3, 16, 16)
    for bits in ("4w4a", "2w4a"):
        got = _download(client, f"/v1/jobs/{job_id}/checkpoints/{bits}?format=safetensors", tmp_path / f"{bits}.safetensors")
        local = export_checkpoint(last, bits, tmp_path / "local", source_job=job_id)
        served, fresh = load_file(got), load_file(local)
        assert served.keys() == fresh.keys()
        assert all(torch.equal(served[k], fresh[k]) for k in served), bits
        model = load_quantized(got)
        with torch.no_grad():
            assert torch.equal(model(x), fake_quant_reference(backbone, bits, x)), bits
    onnx_file = _download(client, f"/v1/jobs/{job_id}/checkpoints/2w4a?format=onnx", tmp_path / "2w4a.onnx")
    cmp = compare_onnx(onnx_file, load_quantized(tmp_path / "2w4a.safetensors"), x)
    assert cmp["mean_abs_diff"] <= 1e-3 * max(cmp["max_abs_ref"], 1.0), cmp

    part = client.get(f"/v1/jobs/{job_id}/checkpoints/2w4a", params={"format": "safetensors"}, headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == (tmp_path / "2w4a.safetensors").read_bytes()[:8]
    assert _field(client.get(f"/v1/jobs/{job_id}/checkpoints/2w4a", params={"format": "tflite"})) == ["query", "format"]

    # a corrupted download is refused
    data = bytearray((tmp_path / "4w4a.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "bad.safetensors")

    # bad requests
    post = lambda body: client.post(f"/v1/jobs/{job_id}/exports", json=body)  # noqa: E731
    assert _field(post({"bits": ["9w4a"]})) == ["body", "bits", 0]
    assert _field(post({"bits": []})) == ["body", "bits"]
    assert _field(post({"bits": ["4w4a", "4w4a"]})) == ["body", "bits"]
    assert _field(post({"bits": ["4w4a"], "formats": ["tflite"]})) == ["body", "formats", 0]
    assert _field(post({"bits": ["fp"], "formats": ["torchvision"]})) == ["body", "formats"]  # width 0.0625
    assert _field(post({"bits": ["4w4a"], "formats": ["torchvision"]})) == ["body", "formats"]
    assert _field(post({"bits": ["4w4a"], "calib": 3})) == ["body", "calib"]
    assert _field(post({"bits": ["4w4a"], "formats": ["onnx"], "onnx_form": "fast"})) == ["body", "onnx_form"]
    assert _field(post({"bits": ["4w4a"], "onnx_form": "storage"})) == ["body", "onnx_form"]  # no onnx in formats

    # the ONNX graph's form is the user's choice; the manifest says which was written
    from ssql_core.export.onnx_graph import read_onnx

    resp = post({"bits": ["3w3a"], "formats": ["onnx"], "onnx_form": "storage"})
    assert resp.status_code == 202, resp.text
    assert _finished(client, resp.json()["id"])["status"] == "succeeded"
    _, manifest = read_onnx(_download(client, f"/v1/jobs/{job_id}/checkpoints/3w3a?format=onnx", tmp_path / "3w3a.onnx"))
    assert manifest["form"] == "storage" and not manifest["integer_convs"], manifest["form"]
    _, default = read_onnx(onnx_file)
    assert default["form"] == "integer" and default["integer_convs"], default["form"]
    assert other_client.post(f"/v1/jobs/{job_id}/exports", json={"bits": ["4w4a"]}).status_code == 404
    assert client.post("/v1/jobs/nope/exports", json={"bits": ["4w4a"]}).status_code == 404
    assert client.post(f"/v1/jobs/{export['id']}/exports", json={"bits": ["4w4a"]}).status_code == 409


def test_export_of_an_unfinished_job_is_409(client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json={**TINY, "epochs": 400, "seed": 43, "export_bits": []}).json()
    resp = client.post(f"/v1/jobs/{job['id']}/exports", json={"bits": ["4w4a"]})
    assert resp.status_code == 409 and "not succeeded" in resp.text
    client.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for(client, job["id"], lambda j: j["status"] in DONE, timeout=30)


def test_bad_export_bits_on_pretrain_name_the_field(client: httpx.Client) -> None:
    assert _field(client.post("/v1/jobs", json={**TINY, "export_bits": ["4w4a", "1w1a"]})) == ["body", "export_bits", 1]
    assert _field(client.post("/v1/jobs", json={**TINY, "export_bits": "4w4a"})) == ["body", "export_bits"]


def test_eval_job_registers_classifiers(client: httpx.Client, small_eval: str, tmp_path: Path) -> None:
    from ssql_core.export import load_quantized

    ckpts = client.get(f"/v1/jobs/{small_eval}/checkpoints").json()
    assert _pairs(ckpts) == [("fp", "safetensors"), ("4w4a", "safetensors")]
    model = load_quantized(_download(client, ckpts[1]["url"], tmp_path / "c.safetensors"))
    assert model.manifest["kind"] == "classifier"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # an eval job exports classifiers only at the bit-widths it trained heads for
    resp = client.post(f"/v1/jobs/{small_eval}/exports", json={"bits": ["2w4a"]})
    assert _field(resp) == ["body", "bits"]


def test_distill_job_end_to_end(client: httpx.Client, small_eval: str, tmp_path: Path) -> None:
    from ssql_core.export import load_quantized

    body = {"kind": "distill", "source_job": small_eval, "bits": "4w4a", "quantizer": "psq", "epochs": 1,
            "batch_size": 16, "max_samples": 64, "calib_images": 16}  # fmt: skip
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["config"]["quantizer"] == "psq"
    pact_job = client.post("/v1/jobs", json={**body, "quantizer": "pact"}).json()  # queued behind the first
    job = _finished(client, resp.json()["id"])
    (row,) = client.get(f"/v1/jobs/{job['id']}/results").json()["rows"]
    assert row["bits"] == "4w4a" and row["protocol"] == "sqakd" and row["quantizer"] == "psq"
    assert 0.0 <= row["top1"] <= 100.0 and row["ptq_top1"] is not None and row["labels_used"] is False
    assert job["summary"]["packed_checkpoint"] == "student-4w4a.safetensors"
    ckpts = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    assert _pairs(ckpts) == [("4w4a", "safetensors")]
    model = load_quantized(_download(client, ckpts[0]["url"], tmp_path / "s.safetensors"))
    assert model.manifest["kind"] == "classifier" and model.manifest["bits"] == "4w4a"

    pact = _finished(client, pact_job["id"])
    assert pact["summary"]["packed_checkpoint"] is None
    assert "psq" in pact["summary"]["no_packed_checkpoint_reason"]
    assert client.get(f"/v1/jobs/{pact['id']}/checkpoints").json() == []
    assert client.get(f"/v1/jobs/{pact['id']}/results").json()["rows"][0]["quantizer"] == "pact"


def test_bad_distill_input_names_the_field(client: httpx.Client, small_pretrain: str, small_eval: str) -> None:
    base = {"kind": "distill", "source_job": small_eval, "bits": "4w4a", "epochs": 1}
    cases = [
        ({"quantizer": "xnor"}, ["body", "quantizer"], "unknown quantizer"),
        ({"bits": "9w4a"}, ["body", "bits"], "9"),
        ({"bits": "fp"}, ["body", "bits"], "quantized student"),
        ({"epochs": 0}, ["body", "epochs"], ""),
        ({"bn": "sometimes"}, ["body", "bn"], ""),
        ({"heads": "/etc/passwd"}, ["body", "heads"], "set by the server"),
        ({"colour": 1}, ["body", "colour"], "unknown"),
        ({"source_job": small_pretrain}, ["body", "source_job"], "no eval job"),
        ({"source_job": "nope"}, ["body", "source_job"], "no eval job"),
    ]
    for patch, loc, words in cases:
        resp = client.post("/v1/jobs", json={**base, **patch})
        assert _field(resp) == loc, (patch, resp.text)
        assert words in resp.json()["detail"][0]["msg"], (patch, resp.text)
    # an eval without an "fp" head cannot be a teacher
    no_fp = client.post("/v1/jobs", json={"kind": "eval", "source_job": small_pretrain, "bits": ["4w4a"], "epochs": 1,
                                          "max_samples": 64, "calib_images": 16}).json()  # fmt: skip
    resp = client.post("/v1/jobs", json={**base, "source_job": no_fp["id"]})
    assert _field(resp) == ["body", "source_job"] and "has not succeeded" in resp.text  # queued or running now
    _finished(client, no_fp["id"])
    resp = client.post("/v1/jobs", json={**base, "source_job": no_fp["id"]})
    assert _field(resp) == ["body", "source_job"] and "'fp'" in resp.text


def test_catalog_lists_kinds_quantizers_formats(client: httpx.Client) -> None:
    cat = client.get("/v1/catalog").json()
    assert cat["job_kinds"] == ["pretrain", "eval", "distill", "export", "finetune"]
    assert cat["quantizers"] == ["psq", "pact", "lsq", "dorefa", "ewgs"]
    assert cat["export_formats"] == ["safetensors", "onnx", "torchvision"]
    assert cat["default_export_bits"] == ["fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a"]


def test_qat_baseline_pretrain_succeeds_without_packed_files(client: httpx.Client) -> None:
    """SimSiam-PACT's own quantizers have no packed format: the training stands, the summary says why."""
    resp = client.post("/v1/jobs", json={**TINY, "method": "simsiam_pact", "bits": "4w4a", "epochs": 1, "seed": 44})
    assert resp.status_code == 201, resp.text
    job = _finished(client, resp.json()["id"])
    assert "own quantizers" in job["summary"]["exports_skipped"] and job["summary"]["exports"] == []
    assert _pairs(client.get(f"/v1/jobs/{job['id']}/checkpoints").json()) == [("fp", "torch")]
