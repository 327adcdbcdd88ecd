"""Uploaded datasets end to end: a real API, Celery worker, Postgres and Redis, with the object
store on S3 (moto's server over HTTP on 127.0.0.1) and only the store shared between the API
and the worker's cache (decision 018).
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest

from persistence.db import make_engine, make_sessionmaker
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.settings import Settings
from ssql_cli.stack import Stack, free_port
from storage.archives import pack_folder
from tests.service.conftest import REDIS_URL, TINY, clean_env, create_database, wait_for
from tests.service.s3 import CREDENTIALS, moto_server
from tests.service.test_storage import good_entries, make_folder, png

pytestmark = pytest.mark.service
BUCKET = "ssql-datasets"
PREFIX = "svc"
#: where users keep data they register by URI (the server may read it: SSQL_DATASET_URI_BUCKETS)
USER_BUCKET = "user-data"
MAX_UPLOAD = 1_000_000
QUOTA = 600_000


@pytest.fixture(scope="module")
def ds_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, dict[str, str], object]]:
    home = tmp_path_factory.mktemp("ds_home")
    url, drop = create_database("ssql_ds")
    queue = f"gpu-ds-{uuid.uuid4().hex[:8]}"
    with moto_server(BUCKET) as server:
        endpoint = server.url
        env = clean_env(
            SSQL_HOME=str(home), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS_URL, SSQL_QUEUE=queue, SSQL_DEVICE="cpu",
            SSQL_LEASE_SECONDS="6", SSQL_HEARTBEAT_SECONDS="0.5", SSQL_RECONCILE_SECONDS="1", SSQL_TORCH_THREADS="1",
            SSQL_STORAGE_URL=f"s3://{BUCKET}/{PREFIX}", AWS_ENDPOINT_URL=endpoint, **CREDENTIALS,
            SSQL_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), SSQL_MAX_DATASET_BYTES_PER_OWNER=str(QUOTA),
            SSQL_DATASET_URI_BUCKETS=f"{USER_BUCKET},ghost-bucket,{BUCKET}",
            SSQL_DOWNLOAD_REDIRECT="1", SSQL_DOWNLOAD_REDIRECT_SECONDS="60",
        )
        settings = Settings(home=home, database_url=url, broker_url=REDIS_URL, queue=queue)
        upgrade_head(settings)
        engine = make_engine(settings)
        sessions = make_sessionmaker(engine)
        stack = Stack(env, free_port(), log_dir=home / "logs")
        stack.start(timeout=90)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket=USER_BUCKET)
        try:
            yield stack, endpoint, env, (sessions, s3, server)
        finally:
            stack.stop()
            engine.dispose()
            drop()


def _key(ds_stack, name: str) -> str:  # type: ignore[no-untyped-def]
    with ds_stack[3][0]() as s:
        return create_key(s, name)


def _client(ds_stack, name: str) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(base_url=ds_stack[0].url, headers={"Authorization": f"Bearer {_key(ds_stack, name)}"}, timeout=60)


@pytest.fixture(scope="module")
def alice(ds_stack) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with _client(ds_stack, "alice") as c:
        yield c


@pytest.fixture(scope="module")
def mallory(ds_stack) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with _client(ds_stack, "mallory") as c:
        yield c


def upload(client: httpx.Client, data: bytes, name: str = "pets", ctype: str = "application/zip") -> httpx.Response:
    return client.post("/v1/datasets", params={"name": name}, content=data, headers={"Content-Type": ctype})


def settled(client: httpx.Client, dataset_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = client.get(f"/v1/datasets/{dataset_id}").json()
        if d["status"] != "validating":
            return d
        time.sleep(0.1)
    raise AssertionError(f"dataset {dataset_id} still validating")


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def stored_keys(ds_stack) -> list[str]:  # type: ignore[no-untyped-def]
    s3 = ds_stack[3][1]
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/").get("Contents", [])]


def test_upload_validates_stores_and_dedups(ds_stack, alice: httpx.Client, mallory: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    data = zip_bytes({**good_entries("pets/"), "pets/README.txt": b"about"})
    r = upload(alice, data)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "validating"
    d = settled(alice, r.json()["id"])
    assert d["status"] == "ready", d
    assert d["sha256"] == hashlib.sha256(data).hexdigest() and d["bytes"] == len(data)
    assert (d["classes"], d["train_images"], d["val_images"], d["dataset"]) == (["a", "b"], 4, 4, f"upload:{d['id']}")
    key = f"{PREFIX}/datasets/"
    assert any(k.startswith(key) and d["sha256"] in k for k in stored_keys(ds_stack))
    again = upload(alice, data, name="other name")
    assert again.status_code == 200 and again.json()["id"] == d["id"]
    assert [x["id"] for x in alice.get("/v1/datasets").json()["items"]].count(d["id"]) == 1
    # another owner sees nothing of it, and may not train on it
    assert mallory.get(f"/v1/datasets/{d['id']}").status_code == 404
    assert mallory.delete(f"/v1/datasets/{d['id']}").status_code == 404
    assert d["id"] not in [x["id"] for x in mallory.get("/v1/datasets").json()["items"]]
    r = mallory.post("/v1/jobs", json={**TINY, "dataset": f"upload:{d['id']}"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dataset"], r.text
    # mallory's own upload of the same archive is a dataset of hers (content-addressed per owner)
    m = upload(mallory, data)
    assert m.status_code == 202 and m.json()["id"] != d["id"]


def test_concurrent_uploads_of_one_archive_make_one_dataset(alice: httpx.Client) -> None:
    data = zip_bytes({**good_entries(), "train/a/extra.png": png(99)})
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: upload(alice, data, name="race"), range(4)))
    assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.status_code == 202 for a in answers) == 1
    sha = hashlib.sha256(data).hexdigest()
    assert [x["sha256"] for x in alice.get("/v1/datasets", params={"limit": 200}).json()["items"]].count(sha) == 1


@pytest.mark.parametrize("case", ["traversal", "absolute", "zip_bomb", "truncated", "single_class", "undecodable", "not_an_archive"])
def test_bad_archives_are_invalid_and_store_nothing(ds_stack, alice: httpx.Client, case: str) -> None:  # type: ignore[no-untyped-def]
    good = good_entries()
    body, expect = {
        "traversal": (lambda: zip_bytes({**good, "../../etc/evil.png": png()}), "../../etc/evil.png: unsafe path"),
        "absolute": (lambda: zip_bytes({**good, "/tmp/abs.png": png()}), "/tmp/abs.png: unsafe path"),
        "zip_bomb": (lambda: zip_bytes({**good, "train/a/z.png": b"\0" * (30 << 20)}), "zip bomb"),
        "truncated": (lambda: zip_bytes(good)[:-200], "not a readable zip archive"),
        "single_class": (lambda: zip_bytes({k: v for k, v in good.items() if "/b/" not in k}), "only one class"),
        "undecodable": (lambda: zip_bytes({**good, "val/b/bad.jpg": b"\xff\xd8garbage"}), "val/b/bad.jpg: does not decode"),
        "not_an_archive": (lambda: b"hello, this is text" * 10, "not a readable zip archive"),
    }[case]
    data = body()
    r = upload(alice, data, name=case)
    assert r.status_code == 202, r.text
    d = settled(alice, r.json()["id"])
    assert d["status"] == "invalid" and expect in d["error"], d
    assert not any(d["sha256"] in k for k in stored_keys(ds_stack))
    job = alice.post("/v1/jobs", json={**TINY, "dataset": f"upload:{d['id']}"})
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "dataset"]
    assert "invalid" in job.json()["detail"][0]["msg"]


def test_wrong_content_type_and_oversize_body(alice: httpx.Client) -> None:
    r = upload(alice, zip_bytes(good_entries()), ctype="text/plain")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "content-type"], r.text
    r = upload(alice, zip_bytes(good_entries()), ctype="application/json")  # JSON is a registration: this is no JSON
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"], r.text
    big = b"\0" * (MAX_UPLOAD + 1)
    r = upload(alice, big)
    assert r.status_code == 413 and "SSQL_MAX_UPLOAD_BYTES" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536

    r = alice.post("/v1/datasets", params={"name": "chunked"}, content=chunks(), headers={"Content-Type": "application/zip"})
    assert r.status_code == 413
    # application/octet-stream: the format is read from the archive's first bytes
    tar = zip_bytes({**good_entries(), "val/a/sniffed.png": png(7)})
    r = upload(alice, tar, name="sniffed", ctype="application/octet-stream")
    assert r.status_code == 202
    d = settled(alice, r.json()["id"])
    assert (d["status"], d["format"]) == ("ready", "zip"), d
    # no ?name=: the file name the client sent, else upload-<sha256[:12]>
    named = alice.post("/v1/datasets", content=zip_bytes({**good_entries(), "val/a/n.png": png(8)}),
                       headers={"Content-Type": "application/zip", "Content-Disposition": 'attachment; filename="pets.zip"'})
    assert named.status_code == 202 and named.json()["name"] == "pets.zip", named.text
    anon = zip_bytes({**good_entries(), "val/a/m.png": png(9)})
    unnamed = alice.post("/v1/datasets", content=anon, headers={"Content-Type": "application/zip"})
    assert unnamed.status_code == 202 and unnamed.json()["name"] == "upload-" + hashlib.sha256(anon).hexdigest()[:12]
    # an ordinary JSON route keeps its own, smaller limit
    assert alice.post("/v1/jobs", content=b"{" + b" " * (2 << 20) + b"}", headers={"Content-Type": "application/json"}).status_code == 413


def test_quota_per_owner(ds_stack) -> None:  # type: ignore[no-untyped-def]
    import os

    with _client(ds_stack, "carol") as carol:
        first = zip_bytes({**good_entries(), "README.bin": os.urandom(400_000)})
        r = upload(carol, first)
        assert r.status_code == 202
        second = zip_bytes({**good_entries(), "README.bin": os.urandom(400_000)})
        r = upload(carol, second)
        assert r.status_code == 413, r.text
        body = r.json()
        assert body["quota"] == "max_dataset_bytes_per_owner" and body["limit"] == QUOTA and body["usage"] == len(first)
        assert upload(carol, first).status_code == 200  # the same archive again takes no more room


def test_pretrain_on_uploaded_folder_then_delete(ds_stack, alice: httpx.Client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = make_folder(tmp_path / "shapes", classes=("red", "blue"), per_split=8)
    archive = pack_folder(folder, tmp_path / "shapes.tar.gz")
    r = upload(alice, archive.read_bytes(), name="shapes", ctype="application/gzip")
    assert r.status_code == 202, r.text
    d = settled(alice, r.json()["id"])
    assert d["status"] == "ready" and d["train_images"] == 16 and d["val_images"] == 16, d
    # the image count is known, so the job has a cost estimate without max_samples
    whole = {k: v for k, v in TINY.items() if k != "max_samples"}
    dry = alice.post("/v1/jobs", params={"dry_run": 1}, json={**whole, "dataset": d["dataset"], "epochs": 1})
    assert dry.status_code == 200 and dry.json()["estimate"]["device_hours"] > 0, dry.text
    job = alice.post("/v1/jobs", json={**TINY, "dataset": d["dataset"], "epochs": 1, "export_bits": []})
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["config"]["dataset"] == d["dataset"]
    blocked = alice.delete(f"/v1/datasets/{d['id']}")  # queued or running: in use
    assert blocked.status_code == 409 and job.json()["id"] in blocked.json()["jobs"]
    done = wait_for(alice, job.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", done
    log = alice.get(f"/v1/jobs/{done['id']}/logs").text
    assert "cache=miss" in log
    _redirected_download(ds_stack, alice, done["id"], tmp_path)
    # the jobs that read the pretrain default to its dataset: evaluated and fine-tuned on the upload
    follow = [alice.post("/v1/jobs", json=b) for b in (
        {"kind": "eval", "source_job": done["id"], "bits": ["fp"], "protocol": "knn", "batch_size": 16},
        {"kind": "finetune", "source_job": done["id"], "bits": "4w4a", "epochs": 1, "batch_size": 16, "calib_images": 16,
         "baseline_epochs": 1})]
    assert [r.status_code for r in follow] == [201, 201], [r.text for r in follow]
    for r in follow:
        assert r.json()["spec"]["config"]["dataset"] == d["dataset"]
        j = wait_for(alice, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=180)
        assert j["status"] == "succeeded", j
        assert "cache=hit" in alice.get(f"/v1/jobs/{j['id']}/logs").text  # fetched once per host
    rows = alice.get(f"/v1/jobs/{follow[0].json()['id']}/results").json()["rows"]
    assert rows and all(row["dataset"] == d["dataset"] for row in rows)
    assert alice.delete(f"/v1/datasets/{d['id']}").status_code == 204
    assert alice.get(f"/v1/datasets/{d['id']}").status_code == 404
    assert not any(d["sha256"] in k for k in stored_keys(ds_stack))
    gone = alice.post("/v1/jobs", json={**TINY, "dataset": d["dataset"]})
    assert gone.status_code == 422 and gone.json()["detail"][0]["loc"] == ["body", "dataset"]


def _redirected_download(ds_stack, alice: httpx.Client, job_id: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SSQL_DOWNLOAD_REDIRECT=1: a 307 to a short-lived presigned URL of the stored file (GET and HEAD)."""
    from urllib.parse import parse_qs, urlsplit

    from ssql_client import Client

    (ck,) = [r for r in alice.get(f"/v1/jobs/{job_id}/checkpoints").json() if r["bits"] == "fp" and r["format"] == "torch"]
    url = f"/v1/jobs/{job_id}/checkpoints/fp?format=torch"
    r = alice.get(url)
    assert r.status_code == 307 and r.headers["etag"] == f'"{ck["sha256"]}"' == f'"{r.headers["x-checksum-sha256"]}"', r.text
    location = r.headers["location"]
    assert location.startswith(ds_stack[1] + f"/{BUCKET}/{PREFIX}/artifacts/{ck['sha256']}")
    assert parse_qs(urlsplit(location).query)["X-Amz-Expires"] == ["60"]
    got = httpx.get(location)  # no API key: the URL alone reads the object
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == ck["sha256"] and len(got.content) == ck["bytes"]
    assert f'filename="{job_id}-fp.pt"' in got.headers["content-disposition"]
    part = httpx.get(location, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == got.content[:10]
    followed = alice.get(url, follow_redirects=True)  # httpx drops the key on the way to another origin
    assert followed.status_code == 200 and hashlib.sha256(followed.content).hexdigest() == ck["sha256"]
    head = alice.head(url)
    assert head.status_code == 307 and head.headers["etag"] == r.headers["etag"]
    there = httpx.head(head.headers["location"])
    assert there.status_code == 200 and int(there.headers["content-length"]) == ck["bytes"]
    assert alice.get(url, headers={"If-None-Match": ck["sha256"]}).status_code == 304
    here = alice.get(url + "&redirect=false")  # what the dashboard asks (its page may fetch only its own origin)
    assert here.status_code == 200 and hashlib.sha256(here.content).hexdigest() == ck["sha256"]
    key = alice.headers["authorization"].split()[1]
    path, sha = Client(ds_stack[0].url, api_key=key).download(job_id, "fp", tmp_path / "fp.pt", "torch")
    assert sha == ck["sha256"] and hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_cli_upload_folder_list_show_rm(ds_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    make_folder(tmp_path / "flowers" / "inner", classes=("rose", "tulip", "iris"), per_split=1)
    env = {**clean_env(SSQL_URL=ds_stack[0].url, SSQL_API_KEY=_key(ds_stack, "dave")), "COLUMNS": "120"}

    def ssql(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ssql_cli.main", *argv], env=env, capture_output=True, text=True, timeout=120)

    up = ssql("datasets", "upload", str(tmp_path / "flowers"), "--name", "flowers")
    assert up.returncode == 0, up.stderr
    assert "ready" in up.stdout and "3 classes (iris, rose, tulip), 3 train / 3 val images" in up.stdout
    assert "B/s" in up.stderr  # the progress bar's rate
    dataset_id = up.stdout.split()[0]
    assert f"upload:{dataset_id}" in up.stdout
    listed = ssql("datasets", "list")
    assert listed.returncode == 0 and dataset_id in listed.stdout and "flowers" in listed.stdout
    shown = ssql("datasets", "show", dataset_id, "--json")
    assert shown.returncode == 0 and '"status": "ready"' in shown.stdout
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    refused = ssql("datasets", "upload", str(bad), "--name", "x")
    assert refused.returncode == 2 and "pass the image folder" in refused.stderr
    assert ssql("datasets", "rm", dataset_id).returncode == 0
    gone = ssql("datasets", "show", dataset_id)
    assert gone.returncode == 2 and "not found" in gone.stderr


def test_catalog_names_the_upload_form(ds_stack) -> None:  # type: ignore[no-untyped-def]
    cat = httpx.get(f"{ds_stack[0].url}/v1/catalog").json()
    assert "upload:<id>" in cat["datasets"] and cat["limits"]["max_upload_bytes"] == MAX_UPLOAD


def test_a_lost_validation_ends_invalid_and_the_archive_can_be_sent_again(ds_stack) -> None:  # type: ignore[no-untyped-def]
    from datetime import datetime, timedelta, timezone

    from persistence.models import Dataset, User

    data = zip_bytes({**good_entries(), "train/b/lost.png": png(5)})
    sha = hashlib.sha256(data).hexdigest()
    with _client(ds_stack, "erin") as erin:
        with ds_stack[3][0]() as s:  # what an API process that died mid-validation leaves behind
            owner = s.query(User).filter_by(name="erin").one().id
            old = datetime.now(timezone.utc) - timedelta(hours=2)
            s.add(Dataset(id=str(uuid.uuid4()), owner_id=owner, name="lost", sha256=sha, bytes=len(data), format="zip",
                          status="validating", created_at=old, updated_at=old))
            s.commit()
        (d,) = erin.get("/v1/datasets").json()["items"]
        assert d["status"] == "invalid" and "did not finish" in d["error"]
        again = upload(erin, data, name="again")
        assert again.status_code == 202 and again.json()["id"] == d["id"]
        assert settled(erin, d["id"])["status"] == "ready"


def test_store_unreachable_at_upload_is_503_and_keeps_nothing(ds_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ssql_cli.stack import api_command

    env = {**ds_stack[2], "SSQL_HOME": str(tmp_path), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    api = Stack(env, free_port(), log_dir=tmp_path / "logs")
    api.api = api._spawn(api_command(api.host, api.port), "api")  # the API alone: same database, a dead store
    try:
        api.wait_ready(90)
        key = _key(ds_stack, "frank")
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as frank:
            r = upload(frank, zip_bytes(good_entries()), name="outage")
            assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["code"] == "store_unavailable", r.text
            assert frank.get("/v1/datasets").json()["items"] == []
        assert not list(tmp_path.glob("uploads/*"))  # nothing spooled
    finally:
        api.stop()


def _put_folder(ds_stack, prefix: str, entries: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    for name, data in entries.items():
        ds_stack[3][1].put_object(Bucket=USER_BUCKET, Key=prefix + name, Body=data)


def test_register_a_folder_and_an_archive_already_in_a_bucket(ds_stack) -> None:  # type: ignore[no-untyped-def]
    folder = {**good_entries(), "train/b/extra.png": png(42)}
    _put_folder(ds_stack, "pets/", folder)
    ds_stack[3][1].put_object(Bucket=USER_BUCKET, Key="pets/", Body=b"")  # a console's folder marker: ignored
    archive = zip_bytes({**good_entries("inner/"), "inner/val/a/more.png": png(43)})
    ds_stack[3][1].put_object(Bucket=USER_BUCKET, Key="archives/pets.zip", Body=archive)
    with _client(ds_stack, "gina") as gina:
        r = gina.post("/v1/datasets", json={"name": "bucket pets", "uri": f"s3://{USER_BUCKET}/pets"})
        assert r.status_code == 202 and r.json()["status"] == "validating", r.text
        assert r.json()["uri"] == f"s3://{USER_BUCKET}/pets/" and r.headers["location"] == f"/v1/datasets/{r.json()['id']}"
        d = settled(gina, r.json()["id"])
        assert (d["status"], d["format"], d["classes"], d["train_images"], d["val_images"]) == ("ready", "tar", ["a", "b"], 5, 4), d
        assert any(d["sha256"] in k for k in stored_keys(ds_stack))  # a copy in the service's store: immutable
        # the same folder again: the same content (the tar is packed deterministically), not a second copy
        again = settled(gina, gina.post("/v1/datasets", json={"name": "again", "uri": f"s3://{USER_BUCKET}/pets/"}).json()["id"])
        assert again["status"] == "invalid" and f"use upload:{d['id']}" in again["error"], again
        from ssql_client import Client

        dz = Client(ds_stack[0].url, api_key=gina.headers["authorization"].split()[1]).register_dataset(
            f"s3://{USER_BUCKET}/archives/pets.zip", "zipped", timeout=60)
        assert (dz["status"], dz["format"], dz["sha256"], dz["bytes"]) == ("ready", "zip", hashlib.sha256(archive).hexdigest(), len(archive)), dz
        assert upload(gina, archive).json()["id"] == dz["id"]  # uploading those bytes finds the registered dataset
        job = gina.post("/v1/jobs", params={"dry_run": 1}, json={**TINY, "dataset": d["dataset"]})
        assert job.status_code == 200, job.text


@pytest.mark.parametrize(("body", "loc", "says"), [
    ({"name": "x", "uri": "http://example.com/data/"}, "uri", "must be s3://"),
    ({"name": "x", "uri": "s3://Not_A_Bucket/x/"}, "uri", "not an S3 bucket name"),
    ({"name": "x", "uri": "s3://someone-elses/x/"}, "uri", "not one this server registers datasets from"),
    ({"name": "x", "uri": "s3://ghost-bucket/x/"}, "uri", "does not exist"),
    ({"name": "x", "uri": f"s3://{USER_BUCKET}/nothing-here/"}, "uri", "no objects under"),
    ({"name": "x", "uri": f"s3://{USER_BUCKET}/missing.zip"}, "uri", "no object s3://"),
    ({"name": "x", "uri": f"s3://{BUCKET}/{PREFIX}/datasets/"}, "uri", "inside (or above) the service's own store"),
    ({"uri": f"s3://{USER_BUCKET}/pets/"}, "name", "required"),
    ({"name": "x", "uri": f"s3://{USER_BUCKET}/pets/", "extra": 1}, "extra", "not permitted"),
])
def test_registration_refusals_name_the_field(ds_stack, alice: httpx.Client, body: dict, loc: str, says: str) -> None:  # type: ignore[no-untyped-def]
    r = alice.post("/v1/datasets", json=body)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", loc] and says in err["msg"], err


def test_registered_folder_with_bad_files_is_invalid_and_stores_nothing(ds_stack, alice: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    _put_folder(ds_stack, "broken/", {**good_entries(), "val/b/bad.jpg": b"\xff\xd8garbage", "train/notes.txt": b"x"})
    before = set(stored_keys(ds_stack))
    r = alice.post("/v1/datasets", json={"name": "broken", "uri": f"s3://{USER_BUCKET}/broken/"})
    assert r.status_code == 202, r.text
    d = settled(alice, r.json()["id"])
    assert d["status"] == "invalid" and "val/b/bad.jpg: does not decode" in d["error"], d
    assert "train/notes.txt: must be inside a class folder" in d["error"], d
    assert d["sha256"] is None and set(stored_keys(ds_stack)) == before


def test_store_outage_mid_job_spends_no_attempt(ds_stack, alice: httpx.Client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The store goes away while a pretrain runs (its end cannot be kept there) and while another
    owner's job must fetch its dataset: both wait in the queue, attempts not spent, and succeed
    once the store is back."""
    from sqlalchemy import select

    from persistence.models import Job, JobAttempt

    sessions, _, server = ds_stack[3]
    folder = make_folder(tmp_path / "outage", classes=("x", "y"), per_split=8)  # not in the worker's cache yet
    with _client(ds_stack, "henry") as henry:
        up = upload(henry, pack_folder(folder, tmp_path / "outage.tar.gz").read_bytes(), name="outage", ctype="application/gzip")
        d = settled(henry, up.json()["id"])
        assert d["status"] == "ready", d
        a = alice.post("/v1/jobs", json={**TINY, "epochs": 6, "export_bits": []}).json()

        def mirrored(j: dict) -> bool:
            if j["status"] != "running" or (j["progress"].get("step") or 0) < 4:
                return False
            with sessions() as s:
                return s.scalar(select(Job.checkpoint_sha256).where(Job.id == a["id"])) is not None

        wait_for(alice, a["id"], mirrored, poll=0.05)
        server.stop()
        try:
            b = henry.post("/v1/jobs", json={**TINY, "dataset": d["dataset"], "epochs": 1, "export_bits": []}).json()
            for c, job_id in ((alice, a["id"]), (henry, b["id"])):  # each attempt ends as the store's fault: back to the queue
                wait_for(c, job_id, lambda j: (j.get("error") or {}).get("code") == "store_unavailable", timeout=90)
        finally:
            server.start()
        for c, job_id in ((alice, a["id"]), (henry, b["id"])):
            done = wait_for(c, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=120)
            assert done["status"] == "succeeded" and done["attempts"] == 1 and not done.get("error"), done
            with sessions() as s:
                outcomes = s.scalars(select(JobAttempt.outcome).where(JobAttempt.job_id == job_id)).all()
            assert "store_unavailable" in outcomes and outcomes.count("succeeded") == 1, outcomes
        assert "cache=miss" in henry.get(f"/v1/jobs/{b['id']}/logs").text
    assert alice.get(f"/v1/jobs/{a['id']}").json()["summary"]["steps"] == 24
