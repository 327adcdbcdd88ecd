"""Issue 19, item 2 (part): a job's cost estimated from its spec, shown on the job, refused over
the server's limits, and ``?dry_run=1`` (docs/decisions/014). Real API process and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from persistence.db import make_engine, make_sessionmaker
from persistence.keys import create_key
from persistence.migrate import upgrade_head
from persistence.settings import Settings
from ssql_cli.stack import Stack, api_command, free_port
from ssql_core.cost import estimate, profile
from tests.service.conftest import REDIS_URL, TINY, clean_env, create_database

pytestmark = pytest.mark.service

#: the job of the issue: it would hold a GPU for weeks
HUGE = {"kind": "pretrain", "backbone": "resnet50", "image_size": 512, "batch_size": 4096, "epochs": 1000,
        "dataset": "digits"}  # fmt: skip


@pytest.fixture(scope="module")
def limited_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An API (no worker: nothing runs) with limits per job: 50 device-hours, 80 GB devices, and
    devices of 1 TFLOP/s."""
    home = tmp_path_factory.mktemp("cost_home")
    url, drop = create_database("ssql_cost")
    upgrade_head(Settings(home=home, database_url=url))
    engine = make_engine(Settings(home=home, database_url=url))
    with make_sessionmaker(engine)() as s:
        key = create_key(s, "coster")
    engine.dispose()
    env = clean_env(SSQL_HOME=str(home), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS_URL, SSQL_DEVICE="cpu",
                    SSQL_QUEUE=f"cost-noworker-{uuid.uuid4().hex[:8]}", SSQL_MAX_JOB_DEVICE_HOURS="50",
                    SSQL_MAX_DEVICE_MEMORY_GB="80", SSQL_DEVICE_TFLOPS="1", SSQL_MAX_EPOCHS="1000")  # fmt: skip
    stack = Stack(env, free_port(), log_dir=home / "logs")
    stack.api = stack._spawn(api_command(stack.host, stack.port), "api")
    try:
        stack.wait_ready(90)
        yield stack.url, key
    finally:
        stack.stop()
        drop()


def test_dry_run_estimates_and_queues_nothing(limited_api) -> None:  # type: ignore[no-untyped-def]
    url, key = limited_api
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        before = len(c.get("/v1/jobs").json()["items"])
        r = c.post("/v1/jobs", params={"dry_run": "1"}, json={**TINY, "epochs": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["dry_run"] is True and body["kind"] == "pretrain" and body["quota"] is None
        est = body["estimate"]
        assert est["device_hours"] > 0 and est["peak_memory_gb"] > 0 and est["device_tflops"] == 1
        assert body["spec"]["config"]["epochs"] == 4
        assert len(c.get("/v1/jobs").json()["items"]) == before  # nothing queued
        # twice the epochs, twice the compute (by construction); the memory is the same
        est8 = c.post("/v1/jobs?dry_run=1", json={**TINY, "epochs": 8}).json()["estimate"]
        assert abs(est8["pflops"] / est["pflops"] - 2) < 2e-3 and est8["peak_memory_gb"] == est["peak_memory_gb"]
        # a bad field is still a 422 in a dry run
        assert c.post("/v1/jobs?dry_run=1", json={**TINY, "epochs": 0}).status_code == 422
        # the estimate is shown on a job that is queued
        job = c.post("/v1/jobs", json={**TINY, "epochs": 4})
        assert job.status_code == 201, job.text
        assert job.json()["spec"]["estimate"] == est
        c.post(f"/v1/jobs/{job.json()['id']}/cancel")


def test_a_job_over_the_servers_limits_is_422(limited_api) -> None:  # type: ignore[no-untyped-def]
    url, key = limited_api
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        before = len(c.get("/v1/jobs").json()["items"])
        r = c.post("/v1/jobs", json={**HUGE, "batch_size": 8})  # fits a device, not the time limit
        assert r.status_code == 422, r.text
        d = r.json()["detail"][0]
        assert d["loc"] == ["body", "epochs"] and "device-hours" in d["msg"] and "50" in d["msg"]
        r = c.post("/v1/jobs", json={**HUGE, "epochs": 1})  # one epoch, but 4096 images of 512 px at once
        assert r.status_code == 422, r.text
        d = r.json()["detail"][0]
        assert d["loc"] == ["body", "batch_size"] and "GB" in d["msg"]
        assert len(c.get("/v1/jobs").json()["items"]) == before


def test_profile_counts_by_construction() -> None:
    small, large = profile("resnet18", 64, 1.0, "imagenet"), profile("resnet18", 128, 1.0, "imagenet")
    assert small.params == large.params  # parameters do not depend on the image size
    assert 3.8 < large.gflops / small.gflops < 4.1  # convolutions: 4x the pixels, 4x the work
    assert abs(profile("resnet18", 32, 1.0, "cifar").gflops - 1.11) < 0.01  # 0.56 GMACs (the known figure)
    half = profile("resnet18", 32, 0.5, "cifar")
    assert 0.2 < half.gflops / profile("resnet18", 32, 1.0, "cifar").gflops < 0.3  # width 1/2: about 1/4
    cfg = {"backbone": "resnet18", "image_size": 32, "dataset": "digits", "epochs": 10, "batch_size": 256}
    one, two = estimate("pretrain", cfg, 10.0), estimate("pretrain", cfg, 20.0)
    assert one is not None and two is not None and abs(one.device_hours / two.device_hours - 2) < 1e-9
    assert estimate("pretrain", {**cfg, "dataset": "imagefolder:x"}, 10.0) is None  # unknown image count


def test_peak_memory_reads_the_resident_peak_in_gib() -> None:
    """ru_maxrss is KiB on Linux: a process that touched 512 MiB reports at least 0.5 GiB, and no
    GPU peak without a GPU (a fresh interpreter, so no earlier peak of this one counts)."""
    import json
    import subprocess
    import sys

    code = ("import json, numpy as np; from ssql_core.runtime import peak_memory; a = np.ones(512 * 2**20 // 8); "
            "print(json.dumps(peak_memory()))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    peak = json.loads(done.stdout)
    assert peak["device_gb"] is None and 0.5 <= peak["rss_gb"] < 64, peak


def test_a_finished_job_records_estimate_vs_actual_and_the_devices_throughput(client: httpx.Client, finished_pretrain: str,
                                                                               sessions) -> None:  # type: ignore[no-untyped-def]
    """A pretrain job that ran (real worker): its summary puts the estimate next to the device-time
    its attempts took; the device kind's measured TFLOP/s is recorded and later estimates use it."""
    from sqlalchemy import select

    from persistence.models import DeviceThroughput

    job = client.get(f"/v1/jobs/{finished_pretrain}").json()
    cost = job["summary"]["cost"]
    assert cost["estimated_device_hours"] == job["spec"]["estimate"]["device_hours"] > 0
    assert cost["actual_device_hours"] > 0 and cost["actual_over_estimate"] > 0
    assert cost["device_kind"].startswith("cpu: ") and cost["measured_tflops"] > 0
    # the runner's measured peak memory next to the estimate's: no GPU here, so the peak RSS of
    # the training process (torch alone holds more than 50 MiB; the machine has far less than 64 GiB)
    peak = job["summary"]["peak_memory"]
    assert peak["device_gb"] is None and 0.05 < peak["rss_gb"] < 64, peak
    assert (cost["actual_peak_memory_of"], cost["actual_peak_memory_gb"]) == ("cpu_rss", peak["rss_gb"])
    assert cost["estimated_peak_memory_gb"] == job["spec"]["estimate"]["peak_memory_gb"]
    assert cost["actual_over_estimated_memory"] == round(peak["rss_gb"] / cost["estimated_peak_memory_gb"], 4)
    with sessions() as s:
        kinds = {r.device_kind: r.tflops for r in s.scalars(select(DeviceThroughput))}
    assert cost["device_kind"] in kinds
    est = client.post("/v1/jobs?dry_run=1", json={**TINY, "epochs": 1}).json()["estimate"]
    slowest = min(kinds, key=kinds.__getitem__)
    assert est["device_kind"] == slowest and abs(est["device_tflops"] - kinds[slowest]) <= 1e-3 * kinds[slowest]


def test_cli_dry_run_prints_the_estimate_and_queues_nothing(limited_api) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    url, key = limited_api
    env = clean_env(SSQL_URL=url, SSQL_API_KEY=key)
    args = [sys.executable, "-m", "ssql_cli.main", "submit", "pretrain", "--dry-run"]
    for k, v in TINY.items():
        if k != "kind":
            args += ["--set", f"{k}={v}"]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        before = len(c.get("/v1/jobs").json()["items"])
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "device-hours" in done.stdout and "peak memory" in done.stdout and "would be accepted" in done.stdout
        assert len(c.get("/v1/jobs").json()["items"]) == before
        huge = [a for k, v in HUGE.items() if k != "kind" for a in ("--set", f"{k}={v}")]
        bad = subprocess.run([*args[:5], *huge, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "422" in bad.stderr, bad.stderr
        assert "epochs: this job is estimated" in bad.stderr and "batch_size: this job needs" in bad.stderr, bad.stderr
