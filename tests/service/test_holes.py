"""Issue 19, item 4 ("the holes"): inputs accepted though wrong, a revocation that did not take
effect, a 500 while the database is away, server paths in errors, lost attempts' folders left on
disk, HEAD, and answers the OpenAPI document did not state (docs/decisions/014). Real API
processes, Postgres, Redis and Celery workers."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from persistence.db import make_engine, make_sessionmaker, utcnow
from persistence.keys import create_key, hash_key
from persistence.migrate import upgrade_head
from persistence.models import Job, JobAttempt, User
from persistence.settings import Settings
from ssql_cli.stack import Stack, api_command, free_port
from tests.service.conftest import REDIS_URL, TINY, clean_env, create_database
from worker.reconciler import reconcile_once

pytestmark = pytest.mark.service

FULL_WIDTH = "\uff14w\uff14a"  # "４w４a": full-width digits


def _loc(resp: httpx.Response) -> list:
    assert resp.status_code == 422, (resp.status_code, resp.text)
    return resp.json()["detail"][0]["loc"]


# --- inputs: bits are ASCII, milestones increase, integers are integers, bodies are UTF-8 ------------


def test_bits_are_ascii_on_every_route_that_takes_bits(client: httpx.Client, finished_pretrain: str) -> None:
    unknown = str(uuid.uuid4())
    for body, loc in [
        ({**TINY, "method": "simsiam_pact", "bits": FULL_WIDTH}, ["body", "bits"]),
        ({**TINY, "export_bits": ["fp", FULL_WIDTH]}, ["body", "export_bits", 1]),
        ({"kind": "eval", "source_job": finished_pretrain, "bits": ["fp", FULL_WIDTH]}, ["body", "bits", 1]),
        ({"kind": "finetune", "source_job": finished_pretrain, "bits": FULL_WIDTH}, ["body", "bits"]),
        ({"kind": "distill", "source_job": unknown, "bits": FULL_WIDTH}, ["body", "bits"]),
        ({"kind": "eval", "source_job": finished_pretrain, "bits": ["\uff46\uff50"]}, ["body", "bits", 0]),  # "ｆｐ"
        ({"kind": "eval", "source_job": finished_pretrain, "bits": ["\u0664w\u0664a"]}, ["body", "bits", 0]),  # Arabic-Indic 4
    ]:
        assert _loc(client.post("/v1/jobs", json=body)) == loc, body
    assert _loc(client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": [FULL_WIDTH]})) == ["body", "bits", 0]
    assert _loc(client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/{FULL_WIDTH}")) == ["path", "bits"]
    # what is accepted is stored canonically (it was stored as sent)
    ok = client.post("/v1/jobs", json={**TINY, "epochs": 1, "method": "simsiam_pact", "bits": "4W4F"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["config"]["bits"] == "4w4a"
    client.post(f"/v1/jobs/{ok.json()['id']}/cancel")


@pytest.mark.parametrize("kind", ["eval", "finetune"])
@pytest.mark.parametrize("milestones", [[0.8, 0.6], [0.6, 0.6]])
def test_lr_milestones_must_increase(client: httpx.Client, finished_pretrain: str, kind: str, milestones: list) -> None:
    resp = client.post("/v1/jobs", json={"kind": kind, "source_job": finished_pretrain, "lr_milestones": milestones})
    assert _loc(resp) == ["body", "lr_milestones"]
    assert "strictly increasing" in resp.json()["detail"][0]["msg"]


def test_integers_are_written_as_integers(client: httpx.Client, finished_pretrain: str) -> None:
    """The README: ``3.0`` is no integer. Every integer field of every kind refuses it, naming it."""
    for body, loc in [
        ({**TINY, "epochs": 3.0}, ["body", "epochs"]),
        ({**TINY, "batch_size": 16.0}, ["body", "batch_size"]),
        ({**TINY, "w_bits": [2.0, 8]}, ["body", "w_bits", 0]),
        ({"kind": "eval", "source_job": finished_pretrain, "epochs": 3.0}, ["body", "epochs"]),
        ({"kind": "finetune", "source_job": finished_pretrain, "seed": 1.0}, ["body", "seed"]),
        ({"kind": "distill", "source_job": str(uuid.uuid4()), "calib_images": 10.0}, ["body", "calib_images"]),
    ]:
        resp = client.post("/v1/jobs", json=body)
        assert _loc(resp) == loc, body
        assert resp.json()["detail"][0]["type"] == "int_spelling"
    # the same number as JSON text "3e0" is a float too; the document says the rule in words
    resp = client.post("/v1/jobs", content=json.dumps(TINY)[:-1] + ', "epochs": 3e0}', headers={"Content-Type": "application/json"})
    assert _loc(resp) == ["body", "epochs"]
    assert "3.0" in client.get("/openapi.json").json()["info"]["description"]


def test_bodies_are_utf8_json(client: httpx.Client) -> None:
    body = json.dumps({**TINY, "epochs": 1})
    for raw in (body.encode("utf-16"), body.encode("utf-16-le"), body.encode("utf-32"), b"\xef\xbb\xbf" + body.encode()):
        resp = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, (raw[:4], resp.status_code, resp.text)
        assert resp.json()["detail"][0]["loc"][0] == "body"
    ok = client.post("/v1/jobs", content=body.encode(), headers={"Content-Type": "application/json"})
    assert ok.status_code == 201, ok.text
    client.post(f"/v1/jobs/{ok.json()['id']}/cancel")


# --- a key revoked by any path stops working within a second --------------------------------------


def _refused_within(c: httpx.Client, seconds: float) -> float:
    start = time.monotonic()
    while c.get(f"/v1/jobs/{uuid.uuid4()}").status_code != 401:
        assert time.monotonic() - start < seconds, "the API still accepts the key"
        time.sleep(0.02)
    assert c.get("/v1/jobs").status_code == 401
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["update", "delete_key", "delete_user"])
def test_key_revoked_in_the_database_is_refused_within_a_second(stack, sessions, pg_url: str, how: str) -> None:  # type: ignore[no-untyped-def]
    name = f"op-{how}-{uuid.uuid4().hex[:6]}"
    with sessions() as s:
        key = create_key(s, name)
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        assert c.get("/v1/jobs").status_code == 200  # cached now (SSQL_AUTH_CACHE_SECONDS=30)
        assert c.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
        statement = {
            "update": "UPDATE api_keys SET revoked_at = now() WHERE key_hash = %s",
            "delete_key": "DELETE FROM api_keys WHERE key_hash = %s",
            "delete_user": "DELETE FROM users WHERE id = (SELECT user_id FROM api_keys WHERE key_hash = %s)",
        }[how]
        with psycopg.connect(pg_url, autocommit=True) as conn:  # an operator's psql session
            conn.execute(statement, (hash_key(key),))
        _refused_within(c, 1.0)


# --- 503 with Retry-After while the database is away ----------------------------------------------


class CuttableProxy:
    """A TCP proxy in front of the real Postgres that can be cut: every connection through it is
    reset and new ones are refused (the port stops listening) until :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            try:  # wakes the accept() blocked on it (a bare close leaves the port listening)
                server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                c.close()
            except OSError:
                pass

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture()
def outage_api(tmp_path: Path) -> Iterator[tuple[str, str, CuttableProxy]]:
    """An API process whose database connection goes through a :class:`CuttableProxy` (cut at
    the start: the API starts while the database is away)."""
    url, drop = create_database("ssql_outage")
    proxy = CuttableProxy(("127.0.0.1", 5432))
    settings = Settings(home=tmp_path, database_url=url)
    upgrade_head(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        key = create_key(s, "outage")
    engine.dispose()
    proxied = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    env = clean_env(SSQL_HOME=str(tmp_path), SSQL_DATABASE_URL=proxied, SSQL_BROKER_URL=REDIS_URL,
                    SSQL_QUEUE=f"outage-{uuid.uuid4().hex[:8]}", SSQL_DEVICE="cpu")  # fmt: skip
    stack = Stack(env, free_port(), log_dir=tmp_path / "logs")
    stack.api = stack._spawn(api_command(stack.host, stack.port), "api")
    try:
        deadline = time.monotonic() + 90
        while True:
            assert stack.api.poll() is None, "the API did not start while the database was away"
            try:
                if httpx.get(f"{stack.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not start while the database was away"
            time.sleep(0.25)
        yield stack.url, key, proxy
    finally:
        proxy.cut()
        stack.stop()
        drop()


def _assert_503(resp: httpx.Response) -> None:
    assert resp.status_code == 503, (resp.request.method, resp.request.url, resp.status_code, resp.text)
    assert int(resp.headers["retry-after"]) > 0
    assert "/" not in resp.json().get("detail", "")  # no server path


def _db_routes(c: httpx.Client, job_id: str) -> list[httpx.Response]:
    return [
        c.get("/v1/jobs"),
        c.get(f"/v1/jobs/{job_id}"),
        c.get(f"/v1/jobs/{job_id}/metrics"),
        c.get(f"/v1/jobs/{job_id}/checkpoints"),
        c.post("/v1/jobs", json={**TINY, "epochs": 1}),
        c.post(f"/v1/jobs/{job_id}/cancel"),
        c.get("/readyz"),
    ]


def test_database_outage_is_503_with_retry_after(outage_api) -> None:  # type: ignore[no-untyped-def]
    url, key, proxy = outage_api
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        # started while the database is away: 503 (auth itself needs the database), not 500
        for resp in _db_routes(c, str(uuid.uuid4())):
            _assert_503(resp)
        proxy.restore()
        deadline = time.monotonic() + 30
        while c.get("/v1/jobs").status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover when the database came back"
            time.sleep(0.2)
        job = c.post("/v1/jobs", json={**TINY, "epochs": 1})
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        assert c.get(f"/v1/jobs/{job_id}").status_code == 200
        # the database goes away under a running API: pooled connections are reset, new ones refused
        proxy.cut()
        for resp in _db_routes(c, job_id):
            _assert_503(resp)
        proxy.restore()
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{job_id}").status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover when the database came back"
            time.sleep(0.2)


# --- no server path in any error ------------------------------------------------------------------

_SERVER_PATH_MARKS = ("/work", "/tmp", "site-packages", '.py"', "/home/", "/usr/", "/var/")


def test_no_server_path_in_any_error_body(client: httpx.Client, finished_pretrain: str, sessions, settings) -> None:  # type: ignore[no-untyped-def]
    bad = [
        # no files for it: the message says where it looked (the server's data root by its setting's name)
        client.post("/v1/jobs", json={**TINY, "dataset": "mnist"}),
        client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "dataset": "mnist"}),
        client.post("/v1/jobs", json={"kind": "finetune", "source_job": finished_pretrain, "dataset": "mnist"}),
        client.post("/v1/jobs", json={**TINY, "method": "nope"}),
        client.post("/v1/jobs", json={**TINY, "data_root": "/etc"}),
        client.post("/v1/jobs", content=b"\xff\xfe{", headers={"Content-Type": "application/json"}),
        client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/9w9a"),
        client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/4w4a", params={"format": "zip"}),
        client.get("/v1/jobs/x/logs", params={"tail": -1}),
    ]
    # a failed job whose recorded error quotes a traceback line and a file (what a runner reports)
    job_id = str(uuid.uuid4())
    artifacts = settings.resolved_artifacts_dir()
    with sessions() as s:
        owner = s.query(User.id).filter(User.name == "alice").scalar()
        now = utcnow()
        s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="failed", spec={"config": {}}, attempts=1,
                  max_attempts=3, cancel_requested=False, created_at=now, updated_at=now, finished_at=now,
                  error={"code": "corrupt_checkpoint", "message": f"cannot read {artifacts}/jobs/{job_id}/last.pt: "
                         'File "/work/main/.venv/lib/python3.11/site-packages/torch/serialization.py", line 1'}))  # fmt: skip
        s.commit()
    bad += [client.get(f"/v1/jobs/{job_id}"), client.get("/v1/jobs", params={"status": "failed", "limit": 1000})]
    for resp in bad:
        if resp.request.url.path.startswith("/v1/jobs/" + job_id) or "status=failed" in str(resp.request.url):
            assert resp.status_code == 200
        else:
            assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code, resp.text)
        leaks = [m for m in _SERVER_PATH_MARKS if m in resp.text]
        assert not leaks, (resp.request.method, str(resp.request.url), leaks, resp.text)
    assert "<data_root>/mnist" in bad[0].json()["detail"][0]["msg"], bad[0].text
    detail = client.get(f"/v1/jobs/{job_id}").json()["error"]["message"]
    assert detail.startswith("cannot read <artifacts>/last.pt"), detail  # still says which file, not where


# --- lost attempts' folders are removed (decision 010) ---------------------------------------------


def test_reaper_removes_the_folders_of_a_job_it_fails(tmp_path: Path) -> None:
    url, drop = create_database("ssql_lost")
    settings = Settings(home=tmp_path, database_url=url, broker_url=REDIS_URL, queue=f"lost-{uuid.uuid4().hex[:8]}")
    upgrade_head(settings)
    engine = make_engine(settings)
    Sessions = make_sessionmaker(engine)
    try:
        with Sessions() as s:
            create_key(s, "lost")
            owner = s.query(User.id).scalar()
            now = utcnow()
            job_id = str(uuid.uuid4())
            s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="running", spec={"config": {}}, attempts=3,
                      max_attempts=3, cancel_requested=False, created_at=now, updated_at=now,
                      lease_until=now - timedelta(seconds=5)))  # fmt: skip
            s.add(JobAttempt(job_id=job_id, attempt=3, worker="dead:1", started_at=now))
            # requeued after its worker died, then cancelled while it waited: no attempt follows
            cancelled = str(uuid.uuid4())
            s.add(Job(id=cancelled, owner_id=owner, kind="pretrain", status="cancelled", spec={"config": {}},
                      attempts=1, claims=1, max_attempts=3, cancel_requested=True, created_at=now, updated_at=now,
                      finished_at=now))  # fmt: skip
            s.commit()
        folders = [settings.resolved_artifacts_dir() / "jobs" / j / "attempts" for j in (job_id, cancelled)]
        for folder, numbers in zip(folders, ((2, 3), (1,)), strict=True):  # kill -9 left the attempts' folders
            for n in numbers:
                (folder / str(n)).mkdir(parents=True)
                (folder / str(n) / "last.pt").write_bytes(b"x")
        out = reconcile_once(settings, Sessions, publish=lambda _j: None)
        assert out["failed"] == [job_id]
        for folder in folders:
            assert not folder.exists(), sorted(folder.rglob("*"))
            assert folder.parent.is_dir()  # the job's published files stay
    finally:
        engine.dispose()
        drop()


# --- HEAD wherever GET, and every answer documented --------------------------------------------------


def test_head_is_answered_wherever_get_is(client: httpx.Client, finished_pretrain: str) -> None:
    listed = client.get(f"/v1/jobs/{finished_pretrain}/checkpoints").json()
    assert listed, "the finished pretrain job has files"
    file_url = listed[0]["url"]
    paths = ["/healthz", "/readyz", "/v1/catalog", "/v1/jobs", f"/v1/jobs/{finished_pretrain}",
             f"/v1/jobs/{finished_pretrain}/metrics", f"/v1/jobs/{finished_pretrain}/results",
             f"/v1/jobs/{finished_pretrain}/checkpoints", f"/v1/jobs/{finished_pretrain}/logs",
             f"/v1/jobs/{finished_pretrain}/events", file_url, "/openapi.json", f"/v1/jobs/{uuid.uuid4()}"]  # fmt: skip
    for path in paths:
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
        assert head.content == b"", path
        for name in ("content-type", "etag", "x-checksum-sha256", "repr-digest", "content-disposition"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)
        if "content-length" in get.headers and path != f"/v1/jobs/{finished_pretrain}/events":
            assert head.headers.get("content-length") == get.headers["content-length"], path
    assert client.head(f"/v1/jobs/{finished_pretrain}/logs", params={"follow": "true"}).status_code == 200
    etag = client.head(file_url).headers["etag"]
    assert client.head(file_url, headers={"If-None-Match": etag}).status_code == 304
    doc = client.get("/openapi.json").json()
    assert not any("head" in ops for ops in doc["paths"].values())  # HEAD is implied by GET, not listed


def _documented(doc: dict, method: str, path: str) -> set[str]:
    import re

    for template, ops in doc["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path) and method.lower() in ops:
            return set(ops[method.lower()]["responses"])
    raise AssertionError(f"{method} {path} is not in the document")


def test_every_answer_seen_is_documented(client: httpx.Client, other_client: httpx.Client, finished_pretrain: str) -> None:
    doc = client.get("/openapi.json").json()
    seen: list[httpx.Response] = [
        client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "epochs": 0}),
        other_client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain}),  # not theirs: 422
        other_client.post("/v1/jobs", json={"kind": "finetune", "source_job": finished_pretrain}),
        other_client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": ["4w4a"]}),  # 404
        client.post(f"/v1/jobs/{finished_pretrain}/exports", json={"bits": ["4w4a"], "formats": ["zip"]}),
        client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "k-" + uuid.uuid4().hex}),
        client.get(f"/v1/jobs/{finished_pretrain}/checkpoints/fp", params={"format": "zip"}),
        client.get(f"/v1/jobs/{finished_pretrain}/logs", params={"tail": -1}),
        client.post(f"/v1/jobs/{finished_pretrain}/cancel"),  # 409: finished
        httpx.get(f"{client.base_url}/v1/jobs"),  # 401
    ]
    key = seen[5].request.headers["idempotency-key"]
    seen.append(client.post("/v1/jobs", json={**TINY, "epochs": 2}, headers={"Idempotency-Key": key}))  # 409
    client.post(f"/v1/jobs/{seen[5].json()['id']}/cancel")
    statuses = set()
    for resp in seen:
        documented = _documented(doc, resp.request.method, resp.request.url.path)
        assert str(resp.status_code) in documented, (resp.request.method, str(resp.request.url), resp.status_code, documented)
        statuses.add(resp.status_code)
    assert {401, 404, 409, 422} <= statuses
    for template, ops in doc["paths"].items():  # every operation that reads the database states its 503
        if template.startswith("/v1/") and template != "/v1/catalog":
            for method, op in ops.items():
                assert "503" in op["responses"], (method, template)
