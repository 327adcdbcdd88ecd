"""docker-compose.yml is a valid Compose file with the services, health checks and GPU reservation."""

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
    assert set(services) == {"postgres", "redis", "api", "worker"}
    for name in services:
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
