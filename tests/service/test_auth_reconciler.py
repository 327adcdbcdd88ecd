"""Item 9 of the reliability issue (parts): revoked keys stop working at once (auth cache), the
reconciler republishes only lost messages, and the OpenAPI document states the answers and the
server's limits. Real API process, Postgres and Redis."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis

from api.state import KeyCache
from persistence.db import make_engine, make_sessionmaker, utcnow
from persistence.keys import create_key, hash_key
from persistence.migrate import upgrade_head
from persistence.models import ApiKey, Job
from persistence.queue import make_celery, publish_job
from persistence.settings import Settings
from tests.service.conftest import REDIS_URL, TINY, create_database
from worker.reconciler import BrokerQueue, reconcile_once

# --- 9a: revocation and the auth cache -------------------------------------------------------------


def _new_key(sessions, name: str) -> str:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return create_key(s, name)


def test_revoked_key_is_refused_at_once_by_the_revoking_process(stack, sessions) -> None:  # type: ignore[no-untyped-def]
    key = _new_key(sessions, f"revoker-{uuid.uuid4().hex[:6]}")
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        assert c.get("/v1/jobs").status_code == 200  # the key is cached now (SSQL_AUTH_CACHE_SECONDS=30)
        assert c.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404  # the inline-auth status route too
        assert c.delete("/v1/keys/current").status_code == 204
        for path in ("/v1/jobs", f"/v1/jobs/{uuid.uuid4()}", "/v1/keys/current"):
            resp = c.request("DELETE" if path.endswith("current") else "GET", path)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
    with sessions() as s:
        assert s.query(ApiKey).filter_by(key_hash=hash_key(key)).one().revoked_at is not None


def test_cli_revocation_reaches_the_api_within_a_second(stack, sessions, service_env) -> None:  # type: ignore[no-untyped-def]
    key = _new_key(sessions, f"leaky-{uuid.uuid4().hex[:6]}")
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
        proc = subprocess.run([sys.executable, "-m", "ssql_cli.main", "keys", "revoke", key[:12]], env=service_env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "revoked 1 key" in proc.stdout
        revoked_at = time.monotonic()
        while c.get(f"/v1/jobs/{uuid.uuid4()}").status_code != 401:
            assert time.monotonic() - revoked_at < 1.0, "the API still accepts a key revoked by the CLI"
            time.sleep(0.02)
        assert c.get("/v1/jobs").status_code == 401
    listed = subprocess.run([sys.executable, "-m", "ssql_cli.main", "keys", "list"], env=service_env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert key[:12] in listed.stdout and key not in listed.stdout
    again = subprocess.run([sys.executable, "-m", "ssql_cli.main", "keys", "revoke", key[:12]], env=service_env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 1  # no such active key


def test_key_cache_bounds() -> None:
    cache = KeyCache(ttl=30.0)
    cache.put("h", 1)
    assert cache.entries["h"][1] - time.monotonic() <= 5.0  # not listening: at most 5 s
    cache.set_listening(True)
    assert cache.entries == {}
    generation = cache.generation
    cache.forget("other")  # a revocation arrives while a lookup of "h" is in flight
    cache.put("h", 1, generation)
    assert cache.get("h") == (False, None)  # the possibly stale answer is not cached
    cache.put("h", 1, cache.generation)
    assert cache.get("h") == (True, 1)
    cache.forget("h")
    assert cache.get("h") == (False, None)


# --- 9b: the reconciler publishes only what is lost --------------------------------------------------


@pytest.fixture()
def recon_settings(tmp_path: Path) -> Iterator[Settings]:
    """A database and a queue of their own: the stack's worker must neither see nor run these jobs."""
    url, drop = create_database("ssql_recon")
    queue = f"recon-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(home=tmp_path, database_url=url, broker_url=REDIS_URL, queue=queue, stale_queued_seconds=0.4)
    upgrade_head(settings)
    try:
        yield settings
    finally:
        redis.Redis.from_url(REDIS_URL).delete(queue)
        drop()


def test_waiting_jobs_are_not_republished_while_their_message_waits(recon_settings: Settings) -> None:
    settings = recon_settings
    engine = make_engine(settings)
    Sessions = make_sessionmaker(engine)
    app = make_celery(settings)
    r = redis.Redis.from_url(REDIS_URL)
    published: list[str] = []

    def publish(job_id: str) -> None:
        publish_job(app, job_id, settings.queue)
        published.append(job_id)

    try:
        with Sessions() as s:
            create_key(s, "recon")
            owner = s.query(ApiKey).one().user_id
            now = utcnow()
            ids = [str(uuid.uuid4()) for _ in range(8)]
            for i, job_id in enumerate(ids):
                # 6 published long ago (their messages below), 2 never published (publish failed)
                s.add(Job(id=job_id, owner_id=owner, kind="pretrain", status="queued", spec={"config": TINY},
                          attempts=0, max_attempts=3, cancel_requested=False, created_at=now, updated_at=now,
                          published_at=None if i >= 6 else now - timedelta(seconds=5)))  # fmt: skip
            s.commit()
        for job_id in ids[:6]:
            publish_job(app, job_id, settings.queue)
        assert r.llen(settings.queue) == 6
        assert BrokerQueue(settings).job_ids() == set(ids[:6])

        # several reconciler periods: only the two never published are sent, once
        for _ in range(5):
            reconcile_once(settings, Sessions, publish)
            time.sleep(settings.stale_queued_seconds)
        assert sorted(published) == sorted(ids[6:])
        assert r.llen(settings.queue) == 8  # one message per job, no duplicates

        # the broker loses the messages: each job is published again exactly once
        r.delete(settings.queue)
        published.clear()
        for _ in range(5):
            reconcile_once(settings, Sessions, publish)
            time.sleep(settings.stale_queued_seconds)
        assert sorted(published) == sorted(ids)
        assert r.llen(settings.queue) == 8
    finally:
        app.close()
        engine.dispose()


# --- 9c: the OpenAPI document states the answers and the limits --------------------------------------


def test_openapi_lists_answers_and_limits(stack, client: httpx.Client, finished_pretrain: str) -> None:  # type: ignore[no-untyped-def]
    doc = httpx.get(f"{stack.url}/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    public = {"/healthz", "/readyz", "/v1/catalog"}
    for path, ops in paths.items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if path not in public:
                assert "401" in codes, (method, path)
            if "{job_id}" in path:
                assert "404" in codes, (method, path)
                param = next(p for p in op["parameters"] if p["name"] == "job_id")
                assert param["schema"]["maxLength"] == 36 and "pattern" in param["schema"], (method, path)
            if op.get("requestBody") or any(p["in"] == "query" for p in op.get("parameters", [])):
                assert "422" in codes, (method, path)

    pre = schemas["PretrainRequest"]["properties"]

    def bound(prop: dict, key: str):  # type: ignore[no-untyped-def]
        for alt in [prop, *prop.get("anyOf", [])]:
            if key in alt:
                return alt[key]
        raise AssertionError(f"{key} not stated in {prop}")

    assert bound(pre["epochs"], "maximum") == 400  # this server's SSQL_MAX_EPOCHS
    assert bound(pre["epochs"], "minimum") == 1
    assert bound(pre["batch_size"], "maximum") == 4096 and bound(pre["image_size"], "maximum") == 512
    assert bound(pre["bits"], "pattern") == "^[2-8]w[2-8]a$"
    assert bound(pre["lr"], "maximum") == 100.0 and bound(pre["width"], "minimum") == 0.03125
    ev = schemas["EvalRequest"]["properties"]
    assert bound(ev["epochs"], "maximum") == 1000
    assert bound(ev["bits"], "maxItems") == 16
    # an entry is a bit-width or a per-layer map (decision 020): the string form keeps its pattern
    item = bound(ev["bits"], "items")
    assert {"type": "string", "pattern": "^(fp|[2-8]w[2-8]a)$"} in item["anyOf"], item
    layer_map = next(alt for alt in item["anyOf"] if alt.get("type") == "object")
    assert layer_map["minProperties"] == 1 and "pattern" in layer_map["propertyNames"], layer_map
    assert bound(schemas["ExportRequest"]["properties"]["bits"], "maxItems") == 50

    # the schema's bounds are the server's: the maximum is accepted, one above is a 422 naming the field
    ok = client.post("/v1/jobs", json={**TINY, "epochs": 400, "export_bits": []})
    assert ok.status_code == 201, ok.text
    assert client.post(f"/v1/jobs/{ok.json()['id']}/cancel").status_code == 202
    over = client.post("/v1/jobs", json={**TINY, "epochs": 401})
    assert over.status_code == 422 and over.json()["detail"][0]["loc"] == ["body", "epochs"], over.text
    bad_bits = client.post("/v1/jobs", json={"kind": "eval", "source_job": finished_pretrain, "bits": ["9w9a"]})
    assert bad_bits.status_code == 422, bad_bits.text
