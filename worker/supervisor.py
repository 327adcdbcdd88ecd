"""Supervise one attempt of a claimed job: spawn the runner, heartbeat, cancel, record outcome.

The supervising process holds the lease. The training subprocess runs in its own process group
(cancel = SIGTERM to the group, SIGKILL after a grace period) and gets SIGKILL from the kernel
when its supervisor dies (``PR_SET_PDEATHSIG``), so a killed worker leaves no orphan training.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from persistence import job_store
from persistence.job_store import ClaimedJob
from persistence.settings import Settings
from worker.artifacts import collect_artifacts

log = logging.getLogger("ssql.worker")

PR_SET_PDEATHSIG = 1
LOG_TAIL_BYTES = 4000


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def job_workdir(settings: Settings, job_id: str) -> Path:
    return settings.resolved_artifacts_dir() / "jobs" / job_id


def _arm_parent_death_signal() -> None:
    """Runs in the child between fork and exec: die with the supervisor."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run_config(settings: Settings, job: ClaimedJob) -> dict[str, Any]:
    """The user's validated config plus the fields only the server decides (paths, device)."""
    config = dict(job.spec["config"])
    config.update(
        data_root=str(settings.resolved_data_root()),
        device=settings.device,
        allow_download=settings.allow_download,
        num_workers=settings.num_workers,
    )
    if job.kind == "eval":
        assert job.source_job_id is not None
        config["checkpoint"] = str(job_workdir(settings, job.source_job_id) / "last.pt")
    return config


def input_paths(settings: Settings, job: ClaimedJob) -> dict[str, str]:
    """Server files an export or distill job reads: the pretrain ``last.pt`` and an eval's ``heads.pt``."""
    if job.kind == "export":
        paths = {"checkpoint": str(job_workdir(settings, job.spec["pretrain_job"]) / "last.pt")}
        if job.spec["source_kind"] == "eval":
            paths["heads"] = str(job_workdir(settings, job.spec["source_job"]) / "heads.pt")
        return paths
    if job.kind == "distill":
        return {"checkpoint": str(job_workdir(settings, job.spec["pretrain_job"]) / "last.pt"),
                "heads": str(job_workdir(settings, job.spec["source_job"]) / "heads.pt")}
    return {}


def _preflight(job: ClaimedJob, config: dict[str, Any], paths: dict[str, str]) -> dict[str, Any] | None:
    """Problems no retry can fix, reported before a process is started for nothing."""
    needed = dict(paths)
    if job.kind == "eval":
        needed["checkpoint"] = config["checkpoint"]
    for name, path in needed.items():
        if not Path(path).is_file():
            owner = job.spec.get("pretrain_job", job.source_job_id) if name == "checkpoint" else job.source_job_id
            return {
                "code": "missing_checkpoint",
                "field": "source_job",
                "message": f"the {Path(path).name} of job {owner} is gone from the server ({path}); "
                "run that job again",
            }
    return None


def _progress_view(event: dict[str, Any]) -> dict[str, Any]:
    keys = ("phase", "fraction", "epoch", "epochs", "step", "total_steps", "images_per_s", "eta_s", "loss", "lr")
    return {k: event.get(k) for k in keys}


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _describe_exit(rc: int) -> str:
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (killed: out of memory?)" if -rc == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {rc}"


@dataclass
class AttemptState:
    """What the supervisor learned from the runner's events."""

    progress: dict[str, Any] | None = None
    progress_dirty: bool = False
    metrics: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    last_checkpoint: str | None = None


def _is_outage(exc: SQLAlchemyError) -> bool:
    """A database that cannot be reached (retry later), as opposed to a statement it refused
    (bad data: retrying the same write can never succeed)."""
    if getattr(exc, "connection_invalidated", False):
        return True
    return isinstance(exc, (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError))


def _read_events(fd: int, out: queue.Queue) -> None:
    with os.fdopen(fd, "r") as f:
        for line in f:
            try:
                out.put(json.loads(line))
            except json.JSONDecodeError:
                log.warning("runner wrote a malformed event: %r", line[:200])
    out.put(None)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def supervise(
    settings: Settings,
    Sessions: sessionmaker[Session],
    job: ClaimedJob,
    publish: Callable[[str], None],
) -> str:
    """Run one attempt to its end; returns the outcome recorded for the attempt."""
    workdir = job_workdir(settings, job.id)
    workdir.mkdir(parents=True, exist_ok=True)
    resumed_from = str(workdir / "last.pt") if (workdir / "last.pt").exists() else None
    config = run_config(settings, job)
    paths = input_paths(settings, job)
    problem = _preflight(job, config, paths)
    if problem is not None:
        with Sessions() as s:
            job_store.start_attempt(s, job, worker_name(), None, None)
            job_store.finish(s, job.id, job.attempt, "failed", error=problem)
            job_store.end_attempt(s, job.id, job.attempt, "failed")
        return "failed"
    job_file = workdir / f"attempt-{job.attempt}.json"
    job_file.write_text(
        json.dumps(
            {
                "kind": job.kind,
                "job_id": job.id,
                "source_job": job.source_job_id,
                "pretrain_job": job.spec.get("pretrain_job"),
                "workdir": str(workdir),
                "config": config,
                "paths": paths,
                "export_bits": job.spec.get("export_bits", []),
            }
        )
    )
    log_path = workdir / f"attempt-{job.attempt}.log"

    read_fd, write_fd = os.pipe()
    env = dict(os.environ, SSQL_EVENT_FD=str(write_fd), SSQL_SUPERVISOR_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    if settings.torch_threads > 0:
        threads = str(settings.torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.runner", str(job_file)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
            preexec_fn=_arm_parent_death_signal,
            env=env,
        )
    os.close(write_fd)
    events: queue.Queue = queue.Queue()
    threading.Thread(target=_read_events, args=(read_fd, events), daemon=True).start()
    state = AttemptState()
    try:
        with Sessions() as s:
            job_store.start_attempt(s, job, worker_name(), proc.pid, resumed_from)
        log.info("job %s attempt %d: runner pid %d%s", job.id, job.attempt, proc.pid, " (resuming)" if resumed_from else "")
        outcome = _watch(settings, Sessions, job, proc, events, state)
    finally:
        if proc.poll() is None:  # the supervisor itself failed: never leave the runner unsupervised
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    if outcome == "lease_lost":
        with Sessions() as s:
            job_store.end_attempt(s, job.id, job.attempt, outcome)
        return outcome
    try:
        outcome = _record_outcome(settings, Sessions, job, proc.returncode, state, workdir, log_path, publish)
    except Exception as e:  # noqa: BLE001 - never leave the job 'running' for the reaper to call it worker_lost
        log.exception("job %s attempt %d: recording the outcome failed", job.id, job.attempt)
        outcome = _record_failure(Sessions, job, proc.returncode, state, log_path, e)
    with Sessions() as s:
        job_store.end_attempt(s, job.id, job.attempt, outcome)
    return outcome


def _watch(
    settings: Settings,
    Sessions: sessionmaker[Session],
    job: ClaimedJob,
    proc: subprocess.Popen,
    events: queue.Queue,
    state: AttemptState,
) -> str:
    """Pump events and heartbeats until the runner exits; returns "exited" or "lease_lost"."""
    progress_every = min(1.0, settings.heartbeat_seconds)
    last_beat = last_flush = last_renewed = time.monotonic()
    kill_at: float | None = None
    exited_at: float | None = None
    reader_done = False
    while True:
        try:
            ev = events.get(timeout=0.2)
        except queue.Empty:
            ev = False
        while ev is not False:
            if ev is None:
                reader_done = True
            elif ev["event"] == "progress":
                state.progress = _progress_view(ev)
                state.progress_dirty = True
                state.metrics.append(ev)
            elif ev["event"] == "checkpoint":
                state.last_checkpoint = ev.get("path")
            else:
                state.final = ev
            try:
                ev = events.get_nowait()
            except queue.Empty:
                ev = False
        now = time.monotonic()
        due_beat = now - last_beat >= settings.heartbeat_seconds
        due_flush = state.progress_dirty and now - last_flush >= progress_every
        if due_beat or due_flush:
            try:
                with Sessions() as s:
                    cancel = job_store.heartbeat(
                        s, job.id, job.attempt, settings.lease_seconds, state.progress if state.progress_dirty else None
                    )
                    if cancel is not None:
                        job_store.add_metrics(s, job.id, job.attempt, state.metrics)
                state.metrics, state.progress_dirty = [], False
                last_renewed = now
            except SQLAlchemyError as e:
                cancel = None
                if not _is_outage(e):
                    # the database refused what we wrote (not an outage): drop that progress and
                    # those samples, and still renew the lease; retrying them could never succeed
                    log.exception("job %s: progress/metrics refused by the database; dropped", job.id)
                    state.metrics, state.progress_dirty = [], False
                    try:
                        with Sessions() as s:
                            cancel = job_store.heartbeat(s, job.id, job.attempt, settings.lease_seconds)
                        last_renewed = now
                    except SQLAlchemyError:
                        log.exception("job %s: heartbeat failed", job.id)
                        cancel = False
                else:
                    log.exception("job %s: heartbeat failed", job.id)
                    cancel = False
                if cancel is False and now - last_renewed > settings.lease_seconds * 0.8:
                    # database unreachable: keep training, but never past our own lease, after
                    # which the reaper may hand the job to another worker
                    cancel = None
            last_beat = last_flush = now
            if cancel is None:
                log.warning("job %s attempt %d: lease lost, killing runner", job.id, job.attempt)
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
                return "lease_lost"
            if cancel and kill_at is None:
                log.info("job %s: cancel requested, stopping runner", job.id)
                _kill_group(proc, signal.SIGTERM)
                kill_at = now + settings.cancel_grace_seconds
        if kill_at is not None and now >= kill_at and proc.poll() is None:
            _kill_group(proc, signal.SIGKILL)
        if proc.poll() is not None:
            exited_at = exited_at or now
            # the pipe stays open if the runner left a grandchild behind: do not wait for it long
            if reader_done or now - exited_at > 2.0:
                _kill_group(proc, signal.SIGKILL)
                break
    try:
        with Sessions() as s:
            job_store.add_metrics(s, job.id, job.attempt, state.metrics)
    except SQLAlchemyError:  # losing the last samples must not lose the attempt's outcome
        log.exception("job %s: the last metric samples could not be stored; dropped", job.id)
    return "exited"


def _record_outcome(
    settings: Settings,
    Sessions: sessionmaker[Session],
    job: ClaimedJob,
    rc: int,
    state: AttemptState,
    workdir: Path,
    log_path: Path,
    publish: Callable[[str], None],
) -> str:
    final = state.final or {}
    kind = final.get("event")
    with Sessions() as s:
        if kind == "result" and rc == 0:
            progress = dict(state.progress or {}, fraction=1.0, eta_s=0.0)
            job_store.finish(
                s,
                job.id,
                job.attempt,
                "succeeded",
                summary=final.get("summary"),
                results=final.get("results"),
                artifacts=collect_artifacts(
                    job.kind, workdir, settings.resolved_artifacts_dir(), final.get("outputs"), job.source_job_id
                ),
                progress=progress,
            )
            return "succeeded"
        cancel_requested, max_attempts = job_store.job_flags(s, job.id)
        if kind == "cancelled" or (rc < 0 and cancel_requested):
            job_store.finish(s, job.id, job.attempt, "cancelled", error=None, progress=state.progress)
            return "cancelled"
        if kind == "error" and not final.get("retryable", False):
            error = {k: final[k] for k in ("code", "message", "field") if k in final}
            job_store.finish(s, job.id, job.attempt, "failed", error=error, progress=state.progress)
            return "failed"
        detail = final.get("message") or _log_tail(log_path)
        message = f"training process {_describe_exit(rc)}" + (f": {detail}" if detail else "")
        error = {"code": "crashed", "message": message, "attempt": job.attempt}
        if job.attempt < max_attempts:
            if job_store.requeue(s, job.id, job.attempt, error):
                publish(job.id)
                with Sessions() as s2:
                    job_store.mark_published(s2, [job.id])
            return "requeued"
        error["message"] += f" (gave up after {job.attempt} attempts)"
        job_store.finish(s, job.id, job.attempt, "failed", error=error, progress=state.progress)
        return "failed"


def _record_failure(
    Sessions: sessionmaker[Session], job: ClaimedJob, rc: int, state: AttemptState, log_path: Path, exc: Exception
) -> str:
    """The attempt's outcome could not be stored as it was (e.g. its results were refused): fail
    the job with the runner's own error when it reported one, else with what went wrong here."""
    final = state.final or {}
    if final.get("event") == "error":
        error = {k: final[k] for k in ("code", "message", "field") if k in final}
    else:
        detail = final.get("message") or _log_tail(log_path)
        error = {
            "code": "internal_error",
            "message": f"the worker could not record the outcome of this attempt ({type(exc).__name__}: {exc}); "
            f"training process {_describe_exit(rc)}" + (f": {detail}" if detail else ""),
        }
    error["message"] = str(error.get("message", ""))[:LOG_TAIL_BYTES]
    with Sessions() as s:
        job_store.finish(s, job.id, job.attempt, "failed", error=error)
    return "failed"
