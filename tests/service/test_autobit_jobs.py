"""Per-layer bit configurations and autobit through the service (decision 020): an eval job with a
map and an autobit budget, its mixed classifier files (downloaded and reloaded), exports of a map
and of a label, and the 422s that name the field (real Postgres, Redis, Celery)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from tests.service.conftest import TINY, wait_for

DONE = ("succeeded", "failed", "cancelled")


def _layers() -> list[str]:
    from ssql_core.bitconfig import configurable_layers
    from ssql_core.models import build_backbone

    with torch.device("meta"):
        return configurable_layers(build_backbone(TINY["backbone"], "cifar", TINY["width"]))


def _map(w: int = 4, a: int = 8) -> dict[str, str]:
    return {n: f"{2 if n.endswith('conv1') else w}w{a}a" for n in _layers()}


def _detail(resp: httpx.Response) -> dict:
    assert resp.status_code == 422, resp.text
    return resp.json()["detail"][0]


def test_bad_maps_and_budgets_are_422_naming_the_field(client: httpx.Client, finished_pretrain: str) -> None:
    base = {"kind": "eval", "source_job": finished_pretrain}
    unknown = _detail(client.post("/v1/jobs", json={**base, "bits": ["fp", {**_map(), "layer9.0.conv1": "4w8a"}]}))
    assert unknown["loc"] == ["body", "bits", 1] and "layer9.0.conv1" in unknown["msg"]
    partial = _map()
    partial.pop("layer4.1.conv2")
    missing = _detail(client.post("/v1/jobs", json={**base, "bits": [partial]}))
    assert missing["loc"] == ["body", "bits", 0] and "layer4.1.conv2" in missing["msg"]
    small = _detail(client.post("/v1/jobs", json={**base, "autobit": {"budget_bytes": 1000}}))
    assert small["loc"] == ["body", "autobit", "budget_bytes"] and "smallest achievable is" in small["msg"]
    assert _detail(client.post("/v1/jobs", json={**base, "autobit": {"budget_bits": 1.5}}))["loc"] == ["body", "autobit", "budget_bits"]
    assert _detail(client.post("/v1/jobs", json={**base, "autobit": {"budget_bits": 4, "solver": "cplex"}}))["loc"] == ["body", "autobit", "solver"]
    assert _detail(client.post("/v1/jobs", json={**base, "autobit": {"budget_bits": 4, "budgetbits": 4}}))["loc"][:2] == ["body", "autobit"]
    assert _detail(client.post("/v1/jobs", json={**base, "autobit": {"sensitivity": "hessian"}}))["loc"] == ["body", "autobit", "budget_bits"]
    assert _detail(client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": ["mixed-0123abcd"]}))["loc"] == ["body", "bits", 0]
    dry = client.post("/v1/jobs?dry_run=true", json={**base, "bits": [_map()], "autobit": {"budget_bits": 3.0}})
    assert dry.status_code == 200, dry.text
    assert dry.json()["spec"]["config"]["bits"] == [dict(sorted(_map().items()))]


def test_autobit_eval_job_its_mixed_classifiers_and_exports(client: httpx.Client, finished_pretrain: str, live_worker,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    from ssql_core.bitconfig import MixedBits, is_label, parse_bit_config
    from ssql_core.export import load_quantized

    given = _map(3, 4)
    body = {"kind": "eval", "source_job": finished_pretrain, "bits": ["fp", given], "epochs": 1, "batch_size": 32,
            "calib_images": 16, "max_samples": 64,
            "autobit": {"budget_bits": 3.0, "a_bits": 4, "sensitivity": "hessian", "images": 16, "samples": 2}}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    job = wait_for(client, resp.json()["id"], lambda j: j["status"] in DONE, timeout=180)
    assert job["status"] == "succeeded", job
    rows = client.get(f"/v1/jobs/{job['id']}/results").json()["rows"]
    label = parse_bit_config(given).label
    assert [r["bits"] for r in rows[:2]] == ["fp", label] and rows[1]["bit_config"] == dict(sorted(given.items()))
    chosen = rows[2]
    assert is_label(chosen["bits"]) and chosen["weight_bits_avg"] <= 3.0 and chosen["autobit"]["solver"] == "milp"
    assert set(chosen["bit_config"]) == set(_layers()) and chosen["model_bytes"] < rows[0]["model_bytes"]
    files = {c["bits"]: c for c in client.get(f"/v1/jobs/{job['id']}/checkpoints").json()}
    assert {"fp", label, chosen["bits"]} <= set(files)
    dest = tmp_path / "auto.safetensors"
    dest.write_bytes(client.get(files[chosen["bits"]]["url"]).content)
    model = load_quantized(dest)
    assert isinstance(model.bits, MixedBits) and model.manifest["bit_config"] == chosen["bit_config"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # exports: a map from the pretrain job, the chosen label (as ONNX too) from the eval job
    ex = client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": [given]})
    ev = client.post(f"/v1/jobs/{job['id']}/exports", json={"bits": [chosen["bits"]], "formats": ["safetensors", "onnx"]})
    not_evaluated = client.post(f"/v1/jobs/{job['id']}/exports", json={"bits": [_map(6, 8)]})
    assert _detail(not_evaluated)["loc"] == ["body", "bits"]
    for r in (ex, ev):
        assert r.status_code in (201, 202), r.text
        done = wait_for(client, r.json()["id"], lambda j: j["status"] in DONE, timeout=180)
        assert done["status"] == "succeeded", done
    # an export job's files are served under its source job, a map's by its label
    assert (label, "safetensors", ex.json()["id"]) in {
        (c["bits"], c["format"], c["produced_by"]) for c in client.get(f"/v1/jobs/{finished_pretrain}/checkpoints").json()}
    onnx = next(c for c in client.get(f"/v1/jobs/{job['id']}/checkpoints").json() if c["format"] == "onnx")
    assert onnx["bits"] == chosen["bits"] and onnx["produced_by"] == ev.json()["id"]
    assert client.get(onnx["url"]).status_code == 200
    # the chain names a map by its label (an eval with a map in its bits was a 500 on the lineage route)
    for of in (finished_pretrain, job["id"]):
        chain = client.get(f"/v1/jobs/{of}/lineage")
        assert chain.status_code == 200, chain.text
    node = next(n for n in client.get(f"/v1/jobs/{job['id']}/lineage").json()["tree"] if n["id"] == job["id"])
    assert f"eval fp,{label}" in node["what"], node


@pytest.mark.parametrize("bits", ["mixed-xyz", "Mixed-0123abcd"])
def test_download_route_refuses_a_malformed_label(client: httpx.Client, finished_pretrain: str, bits: str) -> None:
    assert client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/{bits}").status_code == 422


def test_cli_submits_autobit_with_set(stack, api_key: str, finished_pretrain: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.service.conftest import clean_env

    env = clean_env(SSQL_URL=stack.url, SSQL_API_KEY=api_key)
    base = [sys.executable, "-m", "ssql_cli.main", "submit", "eval", "--source-job", finished_pretrain, "--dry-run"]
    ok = subprocess.run([*base, "--set", 'autobit={"budget_bits": 3.5, "solver": "greedy"}'], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "would be accepted" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([*base, "--set", 'autobit={"budget_bytes": 10}'], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "smallest achievable" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
