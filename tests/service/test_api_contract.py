"""Input validation (422 naming the field), auth, ownership (404), idempotency, catalog, health."""

from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import TINY


def _field(resp: httpx.Response) -> list:
    assert resp.status_code == 422, resp.text
    return resp.json()["detail"][0]["loc"]


@pytest.mark.parametrize(
    ("patch", "loc", "words"),
    [
        ({"dataset": "svhn"}, ["body", "dataset"], "unknown dataset"),
        ({"backbone": "vgg16"}, ["body", "backbone"], "unknown backbone"),
        ({"method": "dino"}, ["body", "method"], "unknown method"),
        ({"epochs": 0}, ["body", "epochs"], "between"),
        ({"epochs": 401}, ["body", "epochs"], "at most 400"),
        ({"bits": "9w4a"}, ["body", "bits"], "9"),
        ({"dataset": "imagefolder:../../etc"}, ["body", "dataset"], "data root"),
        ({"dataset": "imagefolder:/etc"}, ["body", "dataset"], "folder name"),
        ({"data_root": "/etc"}, ["body", "data_root"], "set by the server"),
        ({"device": "cuda:3"}, ["body", "device"], "set by the server"),
        ({"epochz": 3}, ["body", "epochz"], "unknown field"),
        ({"proj_dim": -1}, ["body", "proj_dim"], "positive"),
        ({"epochs": "many"}, ["body", "epochs"], "integer"),
    ],
)
def test_bad_pretrain_input_is_422_naming_the_field(client: httpx.Client, patch: dict, loc: list, words: str) -> None:
    resp = client.post("/v1/jobs", json={**TINY, "epochs": 2, **patch})
    assert _field(resp) == loc
    assert words in resp.json()["detail"][0]["msg"], resp.json()


def test_bad_eval_input_is_422(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={"kind": "eval", "source_job": "nope", "bits": ["fp"]})
    assert _field(resp) == ["body", "source_job"]
    resp = client.post("/v1/jobs", json={"kind": "eval"})
    assert _field(resp) == ["body", "source_job"]
    resp = client.post("/v1/jobs", json={"kind": "distill"})
    assert resp.status_code == 422


def test_bad_bits_on_eval_name_the_field(client: httpx.Client, finished_pretrain: str) -> None:
    for bits in (["fp", "9w4a"], ["4w1a"], [], ["fp", "fp"]):
        resp = client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "bits": bits})
        assert _field(resp) == ["body", "bits"], (bits, resp.text)
    resp = client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "epochs": 0})
    assert _field(resp) == ["body", "epochs"]
    resp = client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "protocol": "svm"})
    assert _field(resp) == ["body", "protocol"]
    resp = client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "checkpoint": "/etc/passwd"})
    assert _field(resp) == ["body", "checkpoint"]


def test_list_filter_validation(client: httpx.Client) -> None:
    assert _field(client.get("/v1/jobs", params={"status": "done"})) == ["query", "status"]


def test_auth_required(stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{stack.url}/v1/jobs").status_code == 401
    bad = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer ssql_not-a-key"})
    assert bad.status_code == 401


def test_other_owner_sees_404_everywhere(client: httpx.Client, other_client: httpx.Client, finished_pretrain: str) -> None:
    job_id = finished_pretrain
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/metrics"),
        ("GET", f"/v1/jobs/{job_id}/results"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints/fp"),
    ]:
        assert other_client.request(method, path).status_code == 404, path
    assert job_id not in [j["id"] for j in other_client.get("/v1/jobs").json()["items"]]
    # nor can another owner evaluate it
    resp = other_client.post("/v1/jobs", json={"kind": "eval", "source_job": job_id})
    assert _field(resp) == ["body", "source_job"]


def test_idempotency_key(client: httpx.Client) -> None:
    body = {**TINY, "epochs": 1, "seed": 7}
    headers = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={**body, "seed": 8}, headers=headers)
    assert other.status_code == 409


def test_list_newest_first_paginated_and_filtered(client: httpx.Client) -> None:
    ids = [client.post("/v1/jobs", json={**TINY, "epochs": 1, "seed": 100 + i}).json()["id"] for i in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2, "kind": "pretrain"}).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert page["next_offset"] == 2
    nxt = client.get("/v1/jobs", params={"limit": 2, "offset": 2, "kind": "pretrain"}).json()
    assert nxt["items"][0]["id"] == ids[0]
    assert client.get("/v1/jobs", params={"kind": "eval", "status": "running"}).status_code == 200


def test_catalog_health_docs(stack, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    cat = httpx.get(f"{stack.url}/v1/catalog").json()
    assert "synthetic" in cat["datasets"] and "resnet18" in cat["backbones"] and "ssql" in cat["methods"]
    assert cat["limits"]["max_epochs"] == 400
    assert "4w4a" in cat["bits"]["paper_set"]
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    assert httpx.get(f"{stack.url}/docs").status_code == 200
    paths = httpx.get(f"{stack.url}/openapi.json").json()["paths"]
    assert "/v1/jobs/{job_id}/checkpoints/{bits}" in paths
