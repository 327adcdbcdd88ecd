"""A worker's dataset cache cold vs warm, and checkpoint downloads served by the API vs redirected to
the store (issue 16). One run, one machine, one S3 endpoint (moto's server on 127.0.0.1 in this
process: a Python server, not MinIO or S3; its absolute speed says nothing about theirs).

1. Cache: a tar of ``--images`` 16x16 PNG images (10 classes, 90 % train) is uploaded through a
   real API (Postgres, Redis, ``SSQL_STORAGE_URL`` on moto) and validated; then
   ``storage.cache.DatasetCache.ensure`` is timed in this process with an empty cache (download,
   sha256 check, extraction) and again (a hit), and two tiny pretrain jobs on the dataset run on a
   real worker with an empty cache: each one's time to first step (its attempt's start to its
   first metric sample; samples are stored every 0.2 s heartbeat) and whether it downloaded
   (its log's ``cache=miss``/``cache=hit``; a hit does not touch the store).
2. Downloads of a job's FP checkpoint (a resnet18 at width ``--width``, one training step): whole
   file and 1 MiB Range requests at random offsets, through the API (FileResponse, the file on the
   API's disk), through the API's 307 to a presigned URL (``SSQL_DOWNLOAD_REDIRECT=1``, a second
   API process on the same database and store, followed), and straight to the presigned URL.
   MB/s of whole downloads (median of ``--repeat``) and p50/p99 latency of ``--ranges`` Ranges.

    nice -n 19 .venv/bin/python bench/cache_and_download.py --images 10000
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REDIS_URL = "redis://127.0.0.1:6379/9"


def _dataset(path: Path, images: int) -> Path:
    from PIL import Image

    rng = random.Random(0)
    with tarfile.open(path, "w") as tf:
        for i in range(images):
            split = "val" if (i // 10) % 10 == 9 else "train"  # 10 % of each class
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
            info = tarfile.TarInfo(f"{split}/c{i % 10}/{i}.png")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
    return path


def _wait(client, job_id: str, timeout: float = 600) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = client.get(f"/v1/jobs/{job_id}").json()
        if j["status"] in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.2)
    raise TimeoutError(job_id)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--width", type=float, default=1.0, help="resnet18 width of the downloaded checkpoint")
    p.add_argument("--repeat", type=int, default=5, help="whole downloads per path")
    p.add_argument("--ranges", type=int, default=200, help="Range requests per path")
    args = p.parse_args()

    import boto3
    import httpx
    from sqlalchemy import select

    from bench._services import BenchServices
    from persistence.db import make_engine, make_sessionmaker
    from persistence.keys import create_key
    from persistence.migrate import upgrade_head
    from persistence.models import JobAttempt, JobMetric
    from persistence.settings import Settings
    from ssql_cli.stack import Stack, api_command, free_port
    from storage.cache import DatasetCache
    from storage.s3 import S3Store

    services = BenchServices.start()
    endpoint, creds, url, db = services.endpoint, services.creds, services.url, services.db
    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
            env.update(SSQL_HOME=str(home / "host"), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS_URL, SSQL_QUEUE=f"bench-{db}",
                       SSQL_STORAGE_URL="s3://bench/store", AWS_ENDPOINT_URL=endpoint, SSQL_DEVICE="cpu", SSQL_TORCH_THREADS="1",
                       SSQL_HEARTBEAT_SECONDS="0.2", SSQL_LEASE_SECONDS="30", **creds)
            settings = Settings(home=home / "host", database_url=url)
            upgrade_head(settings)
            engine = make_engine(settings)
            Sessions = make_sessionmaker(engine)
            with Sessions() as s:
                key = create_key(s, "bench")
            stack = Stack(env, free_port(), log_dir=home / "logs")
            stack.start(timeout=120)
            redirecting = Stack({**env, "SSQL_HOME": str(home / "api2"), "SSQL_DOWNLOAD_REDIRECT": "1"}, free_port(), log_dir=home / "logs2")
            redirecting.api = redirecting._spawn(api_command(redirecting.host, redirecting.port), "api")
            redirecting.wait_ready(90)
            hdr = {"Authorization": f"Bearer {key}"}
            try:
                with httpx.Client(base_url=stack.url, headers=hdr, timeout=600) as client:
                    # 1. the cache
                    archive = _dataset(home / "images.tar", args.images)
                    archive_mb = archive.stat().st_size / 1e6
                    t0 = time.perf_counter()
                    r = client.post("/v1/datasets", params={"name": "bench"}, content=archive.read_bytes(),
                                    headers={"Content-Type": "application/x-tar"})
                    while (d := client.get(f"/v1/datasets/{r.json()['id']}").json())["status"] == "validating":
                        time.sleep(0.1)
                    validated_s = time.perf_counter() - t0
                    assert d["status"] == "ready", d
                    store = S3Store("s3://bench/store", endpoint_url=endpoint)
                    cache = DatasetCache(home / "bench-cache", 1 << 40)  # this process's, as a fresh worker host's
                    skey = next(o["Key"].removeprefix("store/") for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
                        Bucket="bench", Prefix="store/datasets/")["Contents"] if d["sha256"] in o["Key"])
                    t0 = time.perf_counter()
                    _, downloaded = cache.ensure(store, skey, d["sha256"], "tar")
                    cold_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    _, again = cache.ensure(store, skey, d["sha256"], "tar")
                    warm_s = time.perf_counter() - t0
                    assert downloaded and not again
                    firsts = []
                    for _ in range(2):
                        job = client.post("/v1/jobs", json={"kind": "pretrain", "method": "ssql", "backbone": "resnet18", "dataset": d["dataset"],
                                                             "epochs": 1, "batch_size": 16, "image_size": 16, "width": 0.0625,
                                                             "max_samples": 64, "export_bits": []}).json()
                        done = _wait(client, job["id"])
                        assert done["status"] == "succeeded", done
                        with Sessions() as s:
                            start = s.scalar(select(JobAttempt.started_at).where(JobAttempt.job_id == job["id"]))
                            first = s.scalar(select(JobMetric.created_at).where(JobMetric.job_id == job["id"]).order_by(JobMetric.id).limit(1))
                        log = client.get(f"/v1/jobs/{job['id']}/logs").text
                        firsts.append(((first - start).total_seconds(), "cache=miss" in log, "cache=hit" in log))

                    # 2. downloads: a bigger checkpoint (one step)
                    job = client.post("/v1/jobs", json={"kind": "pretrain", "method": "ssql", "backbone": "resnet18", "dataset": "synthetic",
                                                         "epochs": 1, "batch_size": 16, "image_size": 16, "width": args.width,
                                                         "max_samples": 16, "export_bits": []}).json()
                    done = _wait(client, job["id"])
                    assert done["status"] == "succeeded", done
                    (ck,) = [c for c in client.get(f"/v1/jobs/{job['id']}/checkpoints").json() if c["bits"] == "fp" and c["format"] == "torch"]
                    path = f"/v1/jobs/{job['id']}/checkpoints/fp?format=torch"
                    size = ck["bytes"]
                    with httpx.Client(base_url=redirecting.url, headers=hdr, timeout=600, follow_redirects=True) as rclient:
                        location = rclient.get(path, follow_redirects=False).headers["location"]
                        plain = httpx.Client(timeout=600)
                        paths = {
                            "API (FileResponse)": lambda h=None: client.get(path, headers=h or {}),
                            "API 307 -> presigned, followed": lambda h=None: rclient.get(path, headers=h or {}),
                            "presigned URL alone": lambda h=None: plain.get(location, headers=h or {}),
                        }
                        rng = random.Random(1)
                        offsets = [rng.randrange(0, max(1, size - (1 << 20))) for _ in range(args.ranges)]
                        results = {}
                        for name, get in paths.items():
                            get()  # warm
                            whole = []
                            for _ in range(args.repeat):
                                t0 = time.perf_counter()
                                resp = get()
                                whole.append(time.perf_counter() - t0)
                                assert resp.status_code == 200 and len(resp.content) == size
                            lat = []
                            for off in offsets:
                                t0 = time.perf_counter()
                                resp = get({"Range": f"bytes={off}-{off + (1 << 20) - 1}"})
                                lat.append(time.perf_counter() - t0)
                                assert resp.status_code == 206 and len(resp.content) == min(1 << 20, size - off)
                            results[name] = (size / 1e6 / statistics.median(whole), _pct(lat, 0.5) * 1e3, _pct(lat, 0.99) * 1e3)
                        plain.close()
            finally:
                redirecting.stop()
                stack.stop()
                engine.dispose()
        finally:
            services.stop()
    out.append(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; S3: moto server on 127.0.0.1 (this process)")
    out.append(f"dataset: {args.images} images, tar of {archive_mb:.1f} MB; upload + validation through the API {validated_s:.1f} s")
    out.append(f"DatasetCache.ensure: cold (download, sha256, extract) {cold_s:.2f} s; warm (hit) {warm_s * 1e3:.1f} ms; ratio {cold_s / warm_s:.0f}x")
    for i, (first, miss, hit) in enumerate(firsts, 1):
        out.append(f"pretrain job {i} on it (fresh worker cache before job 1): time to first step {first:.2f} s, "
                   f"{'downloaded (cache=miss)' if miss else 'no download (cache=hit)' if hit else '?'}")
    out.append(f"cold / warm time to first step: {firsts[0][0] / firsts[1][0]:.2f}")
    out.append(f"checkpoint: resnet18 width {args.width}, FP file {size / 1e6:.1f} MB; whole-file median of {args.repeat}, "
               f"{args.ranges} Range requests of 1 MiB")
    for name, (mbs, p50, p99) in results.items():
        out.append(f"  {name:32s} {mbs:7.1f} MB/s   Range p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
