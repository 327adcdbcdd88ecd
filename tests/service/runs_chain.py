"""A chain of finished jobs for the compare / lineage / reuse tests (issue 18 items 3 and 4), made
without training: each spec is the server's own answer to a dry run (``POST /v1/jobs?dry_run=1``,
an export's ``api.specs.export_spec``), each row written through the persistence layer as the
worker leaves it (status, results, a 10,000-sample curve by ``job_store.add_metrics``).

    pretrain P (name: a <script>, tags) -> eval E1 -> distill D
                                        -> eval E1 -> export X
                                        -> eval E2
                                        -> finetune F
    mallory's job M, whose source_job_id is P (a row no request can make): never in alice's chain
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select

from api.specs import export_spec
from persistence import job_store
from persistence.db import utcnow
from persistence.models import Job, JobResult, User
from tests.service.conftest import TINY

EVIL_NAME = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
FORMULA_NAME = "=HYPERLINK(\"http://evil.example\",\"x\")"
#: the pretrain's curve: samples, and where its extremes are
STEPS = 10_000
SPIKE_AT, DIP_AT = 4321, 7777


@dataclass
class Chain:
    pretrain: str
    eval1: str
    eval2: str
    distill: str
    finetune: str
    export: str
    foreign: str  # mallory's, sourced from the pretrain
    specs: dict[str, dict[str, Any]]

    def ids(self) -> list[str]:
        return [self.pretrain, self.eval1, self.eval2, self.distill, self.finetune, self.export]


def _dry_run(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs", params={"dry_run": "1"}, json=body)
    assert r.status_code == 200, r.text
    return r.json()["spec"]


def _insert(sessions, owner: str, kind: str, spec: dict[str, Any], source: str | None, age_s: float) -> str:  # type: ignore[no-untyped-def]
    job_id = str(uuid.uuid4())
    at = utcnow() - timedelta(seconds=age_s)
    with sessions() as s:
        user = s.scalar(select(User).where(User.name == owner))
        s.add(Job(id=job_id, owner_id=user.id, kind=kind, status="succeeded", spec=spec, source_job_id=source, attempts=1,
                  max_attempts=3, cancel_requested=False, created_at=at, updated_at=at, started_at=at, finished_at=at,
                  progress={"phase": kind, "fraction": 1.0, "epoch": 1, "epochs": 1, "step": 1, "total_steps": 1}))
        s.commit()
    return job_id


def _results(sessions, job_id: str, rows: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
    with sessions() as s:
        for r in rows:
            s.add(JobResult(job_id=job_id, bits=r["bits"], protocol=r["protocol"], top1=r["top1"],
                            row={k: v for k, v in r.items() if k not in ("bits", "protocol", "top1")}, created_at=utcnow()))
        s.commit()


def pretrain_curve(i: int) -> dict[str, Any]:
    """Sample ``i`` of the pretrain's 10,000-step curve: a decaying, wiggling loss with one spike
    (the maximum) and one dip below zero (the minimum: a negative number in the CSV), a cosine lr."""
    loss = 2.0 * math.exp(-i / 3000) + 0.05 * math.sin(i * 0.7)
    if i == SPIKE_AT:
        loss = 9.5
    if i == DIP_AT:
        loss = -0.75
    lr = 0.05 * 0.5 * (1 + math.cos(math.pi * i / STEPS))
    return {"phase": "pretrain", "epoch": 1 + i // 1000, "step": i + 1, "loss": loss, "lr": lr, "images_per_s": 500 + (i % 7),
            "metrics": {"z_std": 0.02 + 0.001 * math.cos(i)}}


def build(client: httpx.Client, sessions) -> Chain:  # type: ignore[no-untyped-def]
    """Alice's chain (``client`` is alice's) and mallory's row; see the module's docstring."""
    tiny = {k: v for k, v in TINY.items() if k != "kind"}
    specs: dict[str, dict[str, Any]] = {}
    p_spec = _dry_run(client, {"kind": "pretrain", **tiny, "epochs": 2, "export_bits": ["fp", "4w4a"], "method_options": {"proj_dim": 32}})
    pre = _insert(sessions, "alice", "pretrain", p_spec, None, 60)
    specs[pre] = p_spec
    e1_spec = _dry_run(client, {"kind": "eval", "source_job": pre, "bits": ["fp", "4w4a", "2w4a"], "epochs": 1, "calib_images": 16,
                                "max_samples": 64})
    ev1 = _insert(sessions, "alice", "eval", e1_spec, pre, 50)
    e2_spec = _dry_run(client, {"kind": "eval", "source_job": pre, "bits": ["fp", "8w8a", "4w4a"], "epochs": 1, "calib_images": 16,
                                "calibration": "minmax", "probe": "linear", "preset": "paper"})
    ev2 = _insert(sessions, "alice", "eval", e2_spec, pre, 45)
    d_spec = _dry_run(client, {"kind": "distill", "source_job": ev1, "bits": "4w4a", "quantizer": "lsq", "epochs": 1, "max_samples": 64})
    dis = _insert(sessions, "alice", "distill", d_spec, ev1, 40)
    f_spec = _dry_run(client, {"kind": "finetune", "source_job": pre, "bits": "4w4a", "epochs": 2, "batch_size": 16, "max_samples": 64,
                               "calib_images": 16, "baseline_epochs": 1})
    fin = _insert(sessions, "alice", "finetune", f_spec, pre, 35)
    source = {"id": ev1, "kind": "eval", "spec": e1_spec, "source_job_id": pre}
    x_spec = export_spec({"bits": ["4w4a"], "formats": ["safetensors", "onnx"]}, source, p_spec["config"]["width"])
    exp = _insert(sessions, "alice", "export", x_spec, ev1, 30)
    foreign = _insert(sessions, "mallory", "eval", e1_spec, pre, 20)
    specs.update({ev1: e1_spec, ev2: e2_spec, dis: d_spec, fin: f_spec, exp: x_spec})
    for job_id, body in ((pre, {"name": EVIL_NAME, "tags": ["runs-test", "paper"]}), (ev1, {"name": FORMULA_NAME, "tags": ["runs-test"]}),
                         (ev2, {"name": "paper preset", "tags": ["runs-test"]})):
        r = client.patch(f"/v1/jobs/{job_id}", json=body)
        assert r.status_code == 200, r.text
    _results(sessions, ev1, [{"bits": b, "protocol": "linear", "top1": t, "epochs": 1, "calib_images": 16, "dataset": "synthetic"}
                             for b, t in (("fp", 81.5), ("4w4a", 70.25), ("2w4a", 40.0))])
    _results(sessions, ev2, [{"bits": b, "protocol": "linear", "top1": t, "epochs": 1, "calib_images": 16, "dataset": "synthetic"}
                             for b, t in (("fp", 80.0), ("8w8a", 79.5), ("4w4a", 66.0))])
    _results(sessions, dis, [{"bits": "4w4a", "protocol": "sqakd", "top1": 72.0, "ptq_top1": 70.25, "teacher_top1": 81.5,
                              "quantizer": "lsq", "epochs": 1}])
    _results(sessions, fin, [{"bits": "4w4a", "protocol": "finetune", "top1": 74.0, "ptq_linear_top1": 70.25, "quantizer": "psq",
                              "epochs": 2, "curve": [{"epoch": 1, "test_top1": 71.0}, {"epoch": 2, "test_top1": 74.0}]}])
    with sessions() as s:
        job_store.add_metrics(s, pre, 1, [pretrain_curve(i) for i in range(STEPS)])
        job_store.add_metrics(s, ev1, 1, [{"phase": "linear", "epoch": bi + 1, "step": bi + 1, "loss": 1.0 - 0.1 * bi,
                                           "metrics": {"bits_index": bi}} for bi in range(3)])
        for job_id, scale in ((dis, 1.0), (fin, 1.5)):
            job_store.add_metrics(s, job_id, 1, [{"phase": "train", "epoch": 1 + i // 25, "step": i + 1, "loss": scale * math.exp(-i / 20),
                                                  "lr": 0.01 * scale * (1 - i / 50), "images_per_s": 100.0} for i in range(50)])
    return Chain(pre, ev1, ev2, dis, fin, exp, foreign, specs)
