"""Dataset upload through the API vs writing the same archive straight to the store (issue 16).

One run, one machine, one S3 endpoint (moto's server on 127.0.0.1, in this process): a zip of a
tiny valid image folder padded with an incompressible file of ``--mb`` MB is (a) put in the store
with ``storage.S3Store.put_file`` (sha256 + multipart upload), and (b) POSTed to a real API process
(Postgres, ``SSQL_STORAGE_URL`` on the same endpoint) and polled until the dataset is ``ready``
(streamed to a temporary file, hashed, checked, stored). Prints both times, the ratio direct / API
(1.0: the API costs nothing over the store write), and the API process's resident memory before
the big upload (after a small warm-up one) and its peak (VmHWM) after.

    .venv/bin/python bench/upload_throughput.py --mb 256
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REDIS_URL = "redis://127.0.0.1:6379/9"


def _archive(path: Path, mb: int) -> Path:
    from PIL import Image

    def png(c: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (c, 0, 0)).save(buf, "PNG")
        return buf.getvalue()

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for s in ("train", "val"):
            for i, c in enumerate(("a", "b")):
                zf.writestr(f"{s}/{c}/0.png", png(i))
        with zf.open("README.bin", "w") as f:  # outside train/val: counted, stored, never decoded
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
    return path


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256)
    args = p.parse_args()

    import httpx

    from bench._services import BenchServices
    from ssql_cli.stack import Stack, api_command, free_port
    from storage.s3 import S3Store

    services = BenchServices.start()
    endpoint, creds, url, db = services.endpoint, services.creds, services.url, services.db
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        archive = _archive(home / "data.zip", args.mb)
        size = archive.stat().st_size
        try:
            store = S3Store("s3://bench/direct", endpoint_url=endpoint)
            t0 = time.perf_counter()
            store.put_file(f"{hashlib.sha256(archive.name.encode()).hexdigest()}.zip", archive)
            direct_s = time.perf_counter() - t0

            env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
            env.update(SSQL_HOME=str(home), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS_URL, SSQL_QUEUE=f"bench-{db}",
                       SSQL_STORAGE_URL="s3://bench/api", AWS_ENDPOINT_URL=endpoint, SSQL_MAX_UPLOAD_BYTES=str(size + 1), **creds)
            key = services.migrate_and_key(home)
            stack = Stack(env, free_port(), log_dir=home / "logs")
            stack.api = stack._spawn(api_command(stack.host, stack.port), "api")
            stack.wait_ready(90)
            try:
                api_pid = stack.api.pid
                with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
                    # warm: imports (boto3), connections, the store client, with a small archive
                    small = _archive(home / "small.zip", 1).read_bytes()
                    w = client.post("/v1/datasets", params={"name": "warm"}, content=small, headers={"Content-Type": "application/zip"})
                    while client.get(f"/v1/datasets/{w.json()['id']}").json()["status"] == "validating":
                        time.sleep(0.05)
                    rss_before = _rss_kb(api_pid, "VmRSS")

                    def body():  # type: ignore[no-untyped-def]
                        with archive.open("rb") as f:
                            while block := f.read(1 << 20):
                                yield block

                    t0 = time.perf_counter()
                    r = client.post("/v1/datasets", params={"name": "bench"}, content=body(),
                                    headers={"Content-Type": "application/zip", "Content-Length": str(size)})
                    assert r.status_code == 202, r.text
                    accepted_s = time.perf_counter() - t0
                    while (d := client.get(f"/v1/datasets/{r.json()['id']}").json())["status"] == "validating":
                        time.sleep(0.05)
                    api_s = time.perf_counter() - t0
                    assert d["status"] == "ready", d
                    peak = _rss_kb(api_pid, "VmHWM")
            finally:
                stack.stop()
        finally:
            services.stop()
    mb = size / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; S3: moto server on 127.0.0.1")
    print(f"archive: {mb:.1f} MB")
    print(f"direct to the store (S3Store.put_file): {direct_s:.2f} s = {mb / direct_s:.1f} MB/s")
    print(f"through the API until ready:           {api_s:.2f} s = {mb / api_s:.1f} MB/s "
          f"(body received and 202 after {accepted_s:.2f} s)")
    print(f"ratio direct / API: {direct_s / api_s:.2f}")
    print(f"API RSS before {rss_before / 1024:.0f} MB, peak after {peak / 1024:.0f} MB (+{(peak - rss_before) / 1024:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
