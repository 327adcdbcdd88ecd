"""docker-compose.yml is a valid Compose file with the services, health checks and GPU reservation, and an
object store (MinIO) as the only thing API and worker share besides Postgres and Redis."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, cwd=ROOT)


def _compose_config() -> dict:
    """``docker compose config`` (v2) when the plugin is installed, else ``docker-compose config`` (v1)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        proc = _run(["docker", "compose"])
    elif shutil.which("docker-compose"):
        proc = _run(["docker-compose"])
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    assert proc.returncode == 0, f"compose rejected docker-compose.yml:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def test_compose_file_is_valid() -> None:
    cfg = _compose_config()
    services = cfg["services"]
    assert set(services) == {"postgres", "redis", "minio", "minio-init", "api", "worker"}
    for name in set(services) - {"minio-init"}:  # the init makes the buckets and exits
        assert "healthcheck" in services[name], name
    assert "alembic upgrade head" in " ".join(services["api"]["command"])
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["SSQL_DATABASE_URL"].startswith("postgresql://")
        assert env["SSQL_BROKER_URL"].startswith("redis://")
        assert int(env["SSQL_VISIBILITY_TIMEOUT"]) >= 24 * 3600


def test_the_image_copies_every_package_the_project_installs() -> None:
    """The Dockerfile copies folder by folder: a package added to pyproject.toml but not copied
    would build an image whose API cannot import it."""
    import re

    include = re.search(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
    packages = {p.strip().strip('"').rstrip("*") for p in include.split(",") if p.strip()}
    copied = set(re.findall(r"^COPY (\S+) \1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert packages and packages <= copied, f"not copied by the Dockerfile: {sorted(packages - copied)}"


def test_compose_file_object_store_and_nothing_shared_between_api_and_worker() -> None:
    """Read as YAML (works without docker): MinIO with a health check, a bucket-making init with
    minio/mc that API and worker wait for, both configured for the store through S3 settings, and
    no named volume mounted by both (datasets, checkpoints, exports and logs go through the store)."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    minio, init = services["minio"], services["minio-init"]
    assert minio["image"].split(":")[0] == "minio/minio" and minio["command"][0] == "server"
    assert all(":RELEASE." in s["image"] for s in (minio, init)), "MinIO images pinned to a release, not latest"
    assert minio["healthcheck"]["test"] and "miniodata:/data" in minio["volumes"]
    assert init["image"].split(":")[0] == "minio/mc" and init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["entrypoint"])
    assert "mc mb --ignore-existing store/ssql " in script and "http://minio:9000" in script
    assert init["environment"]["AWS_ACCESS_KEY_ID"] == "${SSQL_S3_ACCESS_KEY:-ssql}" == minio["environment"]["MINIO_ROOT_USER"]
    assert init["environment"]["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    named = set(doc["volumes"])
    mounts = {}
    for name in ("api", "worker"):
        svc = services[name]
        env = svc["environment"]
        bucket = env["SSQL_STORAGE_URL"].removeprefix("s3://").split("/")[0]
        assert env["SSQL_STORAGE_URL"].startswith("s3://") and f"store/{bucket}" in script  # the bucket exists at start
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"]
        assert env["AWS_ACCESS_KEY_ID"] == init["environment"]["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SECRET_ACCESS_KEY"] == init["environment"]["AWS_SECRET_ACCESS_KEY"]
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        mounts[name] = {v.split(":")[0] for v in svc["volumes"] if v.split(":")[0] in named}
    assert mounts["api"] and mounts["worker"] and not mounts["api"] & mounts["worker"], mounts
    assert "artifacts" not in named
    assert services["api"]["environment"]["SSQL_DATASET_URI_BUCKETS"] and "store/ssql-datasets" in script
