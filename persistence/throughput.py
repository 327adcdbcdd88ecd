"""Measured device throughput and each job's estimate against its actual cost (decision 014).

When a job succeeds the supervisor records, in the same transaction as the outcome:

* ``summary.cost``: the job's estimated device-hours (``spec.estimate``, made at submission) next
  to the device-hours its attempts actually took (all attempts, times the job's devices), and
  their ratio: the estimate's error, job by job; likewise its estimated peak memory per device
  next to the peak the runner measured (``summary.peak_memory``: the GPU allocator's, else RSS);
* for a single-device pretrain job: the sustained TFLOP/s it ran at (estimated FLOPs per image x
  the images/s it reported), folded into ``device_throughput`` of its device kind (exponential
  average, the newest run weighing 1/2 after the first). Estimates then divide by the slowest
  measured kind (admission is conservative) instead of the ``SSQL_DEVICE_TFLOPS`` prior.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from persistence.db import as_utc, utcnow
from persistence.models import DeviceThroughput, JobAttempt
from persistence.quotas import job_devices


def actual_device_hours(session: Session, job_id: str, kind: str, spec: dict[str, Any], now: datetime) -> float:
    """Device-time of all the job's attempts (an open one up to now) in hours."""
    rows = session.execute(select(JobAttempt.started_at, JobAttempt.ended_at).where(JobAttempt.job_id == job_id)).all()
    seconds = sum(max(0.0, ((as_utc(e) or now) - as_utc(s)).total_seconds()) for s, e in rows if s is not None)
    return seconds * job_devices(kind, spec) / 3600.0


def cost_summary(session: Session, job_id: str, kind: str, spec: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's ``summary.cost``: estimate vs actual device-hours, and the TFLOP/s a
    single-device pretrain ran at (what :func:`record_throughput` folds in). None: no estimate."""
    est = (spec or {}).get("estimate")
    if not isinstance(est, dict) or not est.get("device_hours"):
        return None
    actual = actual_device_hours(session, job_id, kind, spec, utcnow())
    cost: dict[str, Any] = {"estimated_device_hours": est["device_hours"], "actual_device_hours": round(actual, 6),
                            "actual_over_estimate": round(actual / est["device_hours"], 4) if actual > 0 else None,
                            "device_tflops_assumed": est.get("device_tflops")}  # fmt: skip
    summary = summary or {}
    cost.update(_memory(est, summary.get("peak_memory")))
    ips, kind_name = summary.get("images_per_s"), summary.get("device_kind")
    if (kind == "pretrain" and job_devices(kind, spec) == 1 and isinstance(kind_name, str) and kind_name
            and isinstance(ips, (int, float)) and math.isfinite(ips) and ips > 0 and est.get("images")):
        cost.update(device_kind=kind_name[:200], measured_tflops=est["pflops"] * 1e15 / est["images"] * ips / 1e12)
    return cost


def _memory(est: dict[str, Any], peak: Any) -> dict[str, Any]:
    """The estimate's peak memory per device next to what the runner measured: the GPU
    allocator's peak where the job ran on a GPU (what the estimate models), else the process's
    peak RSS (which also holds the Python and torch runtime: on small CPU jobs it is mostly that)."""
    if not isinstance(peak, dict):
        return {}
    device, rss = peak.get("device_gb"), peak.get("rss_gb")
    measured, what = (device, "gpu_allocated") if _finite(device) else (rss, "cpu_rss") if _finite(rss) else (None, None)
    if measured is None:
        return {}
    out: dict[str, Any] = {"estimated_peak_memory_gb": est.get("peak_memory_gb"), "actual_peak_memory_gb": measured,
                           "actual_peak_memory_of": what}  # fmt: skip
    if _finite(est.get("peak_memory_gb")) and est["peak_memory_gb"] > 0:
        out["actual_over_estimated_memory"] = round(measured / est["peak_memory_gb"], 4)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def record_throughput(session: Session, cost: dict[str, Any] | None) -> None:
    """Fold a run's measured TFLOP/s into its device kind's record and commit (its own
    transaction, after the outcome's: a concurrent first record of a kind cannot fail the job)."""
    if not cost or "measured_tflops" not in cost:
        return
    kind, tflops, now = cost["device_kind"], float(cost["measured_tflops"]), utcnow()
    row = session.get(DeviceThroughput, kind, with_for_update=True)
    if row is None:
        session.add(DeviceThroughput(device_kind=kind, tflops=tflops, runs=1, updated_at=now))
    else:
        row.tflops, row.runs, row.updated_at = (row.tflops + tflops) / 2, row.runs + 1, now
    session.commit()


async def slowest_measured(conn: AsyncConnection) -> tuple[str, float] | None:
    """(device kind, TFLOP/s) of the slowest kind measured so far, or None."""
    row = (await conn.execute(select(DeviceThroughput.device_kind, DeviceThroughput.tflops)
                              .order_by(DeviceThroughput.tflops).limit(1))).first()  # fmt: skip
    return None if row is None else (row.device_kind, float(row.tflops))


def measured(session: Session) -> list[dict[str, Any]]:
    """Every device kind measured: kind, TFLOP/s, runs, updated_at."""
    rows = session.execute(select(DeviceThroughput).order_by(func.lower(DeviceThroughput.device_kind))).scalars()
    return [{"device_kind": r.device_kind, "tflops": r.tflops, "runs": r.runs, "updated_at": r.updated_at} for r in rows]
