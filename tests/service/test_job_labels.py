"""Issue 18 item 2: runs you can find. A name, tags and notes on every job (set at submit, edited
with PATCH), and the job list filtered by kind, state, method, dataset, tag and text and sorted by
any column or a result's top-1: over HTTP, in the client and in the CLI (real Postgres, Redis and
Celery; the listed jobs are rows of finished jobs, so no training runs here)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from persistence.db import utcnow
from persistence.models import Job, JobResult, User
from ssql_client import ApiError, Client
from tests.service.conftest import TINY


def _job_row(sessions, owner: str, kind: str, method: str | None, dataset: str, age_s: int, top1: float | None = None) -> str:  # type: ignore[no-untyped-def]
    """A succeeded job row of ``owner`` (as the worker leaves it), with a 4w4a result if ``top1``."""
    job_id = str(uuid.uuid4())
    now = utcnow() - timedelta(seconds=age_s)
    with sessions() as s:
        user = s.scalar(select(User).where(User.name == owner))
        config = {"dataset": dataset, **({"method": method} if method else {})}
        s.add(Job(id=job_id, owner_id=user.id, kind=kind, status="succeeded", spec={"config": config}, attempts=1,
                  max_attempts=3, cancel_requested=False, created_at=now, updated_at=now, started_at=now, finished_at=now))
        if top1 is not None:
            s.flush()
            s.add(JobResult(job_id=job_id, bits="4w4a", protocol="linear", top1=top1, row={}, created_at=now))
        s.commit()
    return job_id


@pytest.fixture(scope="module")
def listed(client: httpx.Client, api_key: str, sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Four jobs of alice with names, tags and notes set through PATCH."""
    jobs = {
        "a": _job_row(sessions, "alice", "pretrain", "ssql", "cifar10", 40),
        "b": _job_row(sessions, "alice", "pretrain", "simsiam", "cifar10", 30),
        "c": _job_row(sessions, "alice", "eval", None, "cifar10", 20, top1=61.5),
        "d": _job_row(sessions, "alice", "eval", None, "digits", 10, top1=70.25),
    }
    labels = {
        "a": {"name": "Zeta SSQL r18", "tags": ["paper", "sweep:lr"], "notes": "lr 0.05, 100% of the data"},
        "b": {"name": "alpha simsiam", "tags": ["paper"]},
        "c": {"name": "eval of zeta", "tags": ["paper", "linear"]},
        "d": {"name": "digits eval", "tags": ["scratch"]},
    }
    for key, body in labels.items():
        r = client.patch(f"/v1/jobs/{jobs[key]}", json=body)
        assert r.status_code == 200, r.text
    return jobs


def _ids(client: httpx.Client, params: object) -> list[str]:
    r = client.get("/v1/jobs", params=params)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["items"]]


def test_labels_at_submit_and_with_patch(client: httpx.Client, other_client: httpx.Client) -> None:
    r = client.post("/v1/jobs", json={**TINY, "epochs": 1, "name": "r18 <b>bold</b>", "tags": ["paper", "x:1", "paper"],
                                      "notes": "line one\nline two"})  # fmt: skip
    assert r.status_code == 201, r.text
    job = r.json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert (job["name"], job["tags"], job["notes"]) == ("r18 <b>bold</b>", ["paper", "x:1"], "line one\nline two")
    assert "name" not in job["spec"]["config"] and "tags" not in job["spec"]["config"]  # labels are no part of the spec
    r = client.patch(f"/v1/jobs/{job['id']}", json={"tags": ["kept"], "name": None})
    assert r.status_code == 200 and (r.json()["name"], r.json()["tags"], r.json()["notes"]) == (None, ["kept"], "line one\nline two")
    assert client.get(f"/v1/jobs/{job['id']}").json()["tags"] == ["kept"]
    assert client.patch(f"/v1/jobs/{job['id']}", json={"tags": []}).json()["tags"] == []
    assert other_client.patch(f"/v1/jobs/{job['id']}", json={"name": "mine"}).status_code == 404
    # bounded: each bad field is named
    for body, loc in (({"name": "x" * 201}, ["body", "name"]), ({"name": "a\x00b"}, ["body", "name"]),
                      ({"tags": ["ok", "<script>"]}, ["body", "tags", 1]), ({"tags": ["a b"]}, ["body", "tags", 0]),
                      ({"tags": [f"t{i}" for i in range(21)]}, ["body", "tags"]), ({"tags": ["x" * 65]}, ["body", "tags", 0]),
                      ({"notes": "n" * 10_001}, ["body", "notes"]), ({"colour": "red"}, ["body", "colour"])):  # fmt: skip
        r = client.patch(f"/v1/jobs/{job['id']}", json=body)
        assert r.status_code == 422 and [d["loc"] for d in r.json()["detail"]] == [loc], (body, r.text)
    r = client.post("/v1/jobs", json={**TINY, "name": "n" * 300, "tags": ["<i>"]})
    assert r.status_code == 422 and sorted(str(d["loc"]) for d in r.json()["detail"]) == ["['body', 'name']", "['body', 'tags', 0]"], r.text


def test_list_filters(client: httpx.Client, other_client: httpx.Client, listed: dict[str, str]) -> None:
    a, b, c, d = (listed[k] for k in "abcd")
    mine = set(listed.values())
    sub = lambda ids: [i for i in ids if i in mine]  # noqa: E731 - other tests' jobs share the owner
    assert sub(_ids(client, {"tag": "paper"})) == [c, b, a]  # newest first
    assert sub(_ids(client, [("tag", "paper"), ("tag", "sweep:lr")])) == [a]  # all the tags
    assert sub(_ids(client, {"tag": "paper", "kind": "eval"})) == [c]
    assert sub(_ids(client, {"method": "simsiam"})) == [b]
    assert sub(_ids(client, {"dataset": "digits", "state": "succeeded"})) == [d]
    assert sub(_ids(client, {"q": "ZETA"})) == [c, a]  # case-insensitive, in the name
    assert sub(_ids(client, {"q": "100%"})) == [a]  # in the notes; % is a character, not a wildcard
    assert sub(_ids(client, {"q": "%"})) == [a]
    assert sub(_ids(client, {"q": d[:8]})) == [d]  # the id's start
    assert _ids(other_client, {"tag": "paper"}) == []  # another owner's tags find nothing of alice's
    assert _ids(client, {"status": "succeeded", "state": "queued"}) == []  # both apply


def test_list_sort(client: httpx.Client, listed: dict[str, str]) -> None:
    a, b, c, d = (listed[k] for k in "abcd")
    mine = set(listed.values())
    sub = lambda ids: [i for i in ids if i in mine]  # noqa: E731
    assert sub(_ids(client, {"sort": "name", "limit": 1000})) == [b, d, c, a]  # alpha, digits, eval, Zeta: case-insensitive
    assert sub(_ids(client, {"sort": "-name", "limit": 1000})) == [a, c, d, b]
    assert sub(_ids(client, {"sort": "+created_at", "limit": 1000})) == [a, b, c, d]
    assert sub(_ids(client, {"sort": "top1:4w4a", "limit": 1000}))[:2] == [d, c]  # best first, jobs without one after
    assert sub(_ids(client, {"sort": "+top1:4w4a", "limit": 1000}))[:2] == [c, d]


@pytest.mark.parametrize(("params", "loc"), [
    ({"colour": "red"}, ["query", "colour"]),
    ({"sort": "size"}, ["query", "sort"]),
    ({"sort": "top1:9w9a"}, ["query", "sort"]),
    ({"tag": "<script>"}, ["query", "tag", 0]),
    ({"state": "done"}, ["query", "state"]),
    ({"kind": "train"}, ["query", "kind"]),
    ({"q": "x" * 201}, ["query", "q"]),
])  # fmt: skip
def test_bad_filters_are_422s(client: httpx.Client, params: dict, loc: list) -> None:
    r = client.get("/v1/jobs", params=params)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text


def test_client_and_cli(stack, api_key: str, listed: dict[str, str], service_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    a, b, c, _d = (listed[k] for k in "abcd")
    c_ = Client(stack.url, api_key)
    page = c_.jobs(tags=["paper"], kind="pretrain", sort="name", limit=1000)
    assert [j["id"] for j in page["items"] if j["id"] in listed.values()] == [b, a]
    assert c_.update(c, notes="checked")["notes"] == "checked"
    with pytest.raises(ApiError) as bad:
        c_.update(c, tags=["no spaces allowed"])
    assert bad.value.status == 422
    env = {**service_env, "SSQL_URL": stack.url, "SSQL_API_KEY": api_key}
    out = subprocess.run([sys.executable, "-m", "ssql_cli.main", "list", "--tag", "paper", "--tag", "sweep:lr", "--limit", "100"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and a in out.stdout and b not in out.stdout and "Zeta SSQL r18" in out.stdout, out
    out = subprocess.run([sys.executable, "-m", "ssql_cli.main", "edit", b, "--name", "renamed", "--tags", "paper,cli"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = c_.job(b)
    assert job["name"] == "renamed" and job["tags"] == ["paper", "cli"]
    out = subprocess.run([sys.executable, "-m", "ssql_cli.main", "list", "--sort", "bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "sort" in out.stderr, out
