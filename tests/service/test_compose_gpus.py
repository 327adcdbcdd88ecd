"""docker-compose.gpus.yml (one worker per GPU) and the compose file's datasets bind, read as YAML
(``docker compose config`` is checked by test_compose.py where compose is installed)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node, deep=True))


def test_one_worker_per_gpu_override() -> None:
    doc = yaml.load((ROOT / "docker-compose.gpus.yml").read_text(), _Loader)
    services = doc["services"]
    ids, names = [], []
    for name in ("worker", "worker-gpu1"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia"
        ids.append(devices[0]["device_ids"])
    names.append("gpu0@%h")
    cmd = services["worker-gpu1"]["command"]
    names.append(cmd[cmd.index("-n") + 1])
    assert ids == [["0"], ["1"]] and names == ["gpu0@%h", "gpu1@%h"]
    assert services["worker-gpu1"]["extends"] == {"file": "docker-compose.yml", "service": "worker"}
    assert "gpu1@$$HOSTNAME" in services["worker-gpu1"]["healthcheck"]["test"][1]


def test_datasets_come_from_a_host_folder_and_the_api_has_no_cuda() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("api", "worker"):
        assert "${SSQL_DATASETS_DIR:-./datasets}:/data/datasets:ro" in doc["services"][name]["volumes"]
    assert "datasets" not in (doc.get("volumes") or {})
    assert doc["services"]["api"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert doc["services"]["api"]["image"] != doc["services"]["worker"]["image"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY ssql_client ssql_client" in dockerfile and "TORCH_INDEX_URL" in dockerfile
