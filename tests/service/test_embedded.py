"""Embedded mode end to end: SQLite + filesystem broker + local artifacts under SSQL_HOME, one
API and one worker process, driven through the ``ssql`` CLI (which verifies the sha256)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssql_cli.stack import Stack, free_port
from tests.service.conftest import TINY, clean_env


def _ssql(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ssql_cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"ssql {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("embedded_home")
    env = clean_env(SSQL_HOME=str(home), SSQL_DEVICE="cpu", SSQL_TORCH_THREADS="1")
    key = _ssql(env, "keys", "create", "carol").strip()
    stack = Stack(env, free_port(), log_dir=home / "logs")
    stack.start(timeout=90)
    yield home, dict(env, SSQL_URL=stack.url, SSQL_API_KEY=key)
    stack.stop()


def test_embedded_stack_end_to_end(embedded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home, env = embedded
    assert (home / "ssql.db").is_file() and (home / "broker").is_dir()
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items() if k != "kind"]
    args = ["submit", "pretrain", *sum((["--set", s] for s in sets), []), "--set", "epochs=3", "--wait"]
    pre_id = _ssql(env, *args).strip()
    status = json.loads(_ssql(env, "status", pre_id, "--json"))
    assert status["status"] == "succeeded" and status["progress"]["fraction"] == 1.0

    ev_id = _ssql(env, "submit", "eval", "--source-job", pre_id, "--bits", "fp,4w4a", "--set", "epochs=2",
                  "--set", "calib_images=16", "--set", "max_samples=64", "--wait").strip()  # fmt: skip
    table = _ssql(env, "results", ev_id)
    assert "fp" in table and "4w4a" in table and "top1" in table

    out = _ssql(env, "download", pre_id, "--bits", "fp", "--out", str(tmp_path / "fp.pt"))
    assert "verified" in out and (tmp_path / "fp.pt").stat().st_size > 0

    # issue 4/5 from the CLI: an ONNX export, a distill job, downloads by format
    ex_id = _ssql(env, "export", pre_id, "--bits", "2w4a", "--formats", "onnx", "--wait").strip()
    listing = _ssql(env, "checkpoints", pre_id)
    assert "onnx" in listing and ex_id in listing and "3w3a" in listing
    out = _ssql(env, "download", pre_id, "--bits", "2w4a", "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert "verified" in out and (tmp_path / "m.onnx").stat().st_size > 0
    ds_id = _ssql(env, "submit", "distill", "--source-job", ev_id, "--bits", "4w4a", "--quantizer", "lsq",
                  *sum((["--set", s] for s in ("epochs=1", "batch_size=16", "max_samples=64", "calib_images=16")), []),
                  "--wait").strip()  # fmt: skip
    table = _ssql(env, "results", ds_id)
    assert "sqakd" in table and "lsq" in table and "ptq_top1" in table
    out = _ssql(env, "download", ds_id, "--bits", "4w4a", "--format", "safetensors", "--out", str(tmp_path / "s.safetensors"))
    assert "verified" in out

    listing = _ssql(env, "list")
    assert pre_id in listing and ev_id in listing
    artifacts = list((home / "artifacts" / "jobs" / pre_id).glob("*.pt"))
    assert {p.name for p in artifacts} >= {"backbone.pt", "last.pt"}
