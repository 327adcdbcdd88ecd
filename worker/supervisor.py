"""Supervise one attempt of a claimed job: spawn the runner, heartbeat, cancel, record outcome.

The supervising process holds the lease. The training subprocess runs in its own process group
(cancel = SIGTERM to the group, SIGKILL after a grace period) and gets SIGKILL from the kernel
when its supervisor dies (``PR_SET_PDEATHSIG``), so a killed worker leaves no orphan training.

Each attempt works in its own folder, ``jobs/<id>/attempts/<token>``, seeded from the job's
published checkpoints; only the lease holder publishes into ``jobs/<id>`` (a hard link / atomic
rename made while the job row is locked by a fenced UPDATE), so a superseded attempt can never
clobber the files of the attempt that owns the job. The runner is told its lease deadline after
every renewal and kills itself when it passes (a stalled supervisor). A graceful worker stop
(SIGTERM) hands the job back: the runner stops at a checkpoint, the job is queued again without
spending an attempt, and another worker resumes it (docs/decisions/010).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import shutil
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

from persistence import job_store, throughput
from persistence.job_store import ClaimedJob
from persistence.models import READS_PRETRAIN_CHECKPOINT
from persistence.settings import Settings
from storage import StoreUnavailable
from worker import checkpoint_store
from worker.artifacts import collect_artifacts
from worker.datasets import dataset_input
from worker.log_mirror import LogMirror

log = logging.getLogger("ssql.worker")

PR_SET_PDEATHSIG = 1
LOG_TAIL_BYTES = 4000
#: the runner stops itself this far into its lease when no renewal reached it (the supervisor
#: gives up at 0.8 of it when the database is away; the reaper only after all of it)
RUNNER_LEASE_FRACTION = 0.9

#: set in a pool process when its worker is asked to stop gracefully (SIGTERM): hand the job back
handback_requested = threading.Event()
#: the error code (and attempt outcome) of an attempt the object store's outage stopped: not the job's fault
STORE_FAULT = "store_unavailable"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def job_workdir(settings: Settings, job_id: str) -> Path:
    """The job's published files (what later jobs and downloads read)."""
    return settings.resolved_artifacts_dir() / "jobs" / job_id


def attempt_workdir(settings: Settings, job_id: str, attempt: int) -> Path:
    """Where one attempt's runner writes; nobody else writes there."""
    return job_workdir(settings, job_id) / "attempts" / str(attempt)


def remove_attempt_folders(settings: Settings, job_id: str, below: int | None = None) -> list[int]:
    """Remove the work folders of a job's attempts (those numbered below ``below``, or all):
    attempts whose lease was taken from them, whose runners are dead by construction (each kills
    itself at 0.9 of its lease, before the lease can be taken over; decision 010). Returns the
    numbers removed."""
    root = job_workdir(settings, job_id) / "attempts"
    try:
        names = [p for p in root.iterdir() if p.name.isdigit() and (below is None or int(p.name) < below)]
    except OSError:
        return []
    for p in names:
        shutil.rmtree(p, ignore_errors=True)
    if below is None:
        with contextlib.suppress(OSError):
            root.rmdir()
    return sorted(int(p.name) for p in names)


def _snapshot(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` is now, atomically: a hard link (the runner replaces its files,
    it never rewrites one in place) or, where links are not possible, a copy; then a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.publish")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _seed(job_dir: Path, attempt_dir: Path) -> str | None:
    """Start an attempt from the job's published checkpoints (the plain files at the top of the
    job folder, other than attempt logs); returns the published ``last.pt`` it resumes from."""
    attempt_dir.mkdir(parents=True, exist_ok=True)
    resumed = None
    for f in sorted(job_dir.iterdir()):
        if f.is_file() and not f.name.startswith(("attempt-", ".")):
            _snapshot(f, attempt_dir / f.name)
            if f.name == "last.pt":
                resumed = str(f)
    return resumed


def _publishable(attempt_dir: Path, job_dir: Path, path: str | None) -> tuple[Path, Path] | None:
    """``(source, destination)`` of a checkpoint the runner reported, if it lies in its folder."""
    if not path:
        return None
    src = Path(path).resolve()
    root = attempt_dir.resolve()
    if root not in src.parents or not src.is_file():
        return None
    return src, job_dir / src.relative_to(root)


def publish_files(Sessions: sessionmaker[Session], job: ClaimedJob, files: list[tuple[Path, Path]]) -> bool:
    """Publish files as the job's, only while this attempt holds the lease (fenced row lock held
    during the renames, so no claim can take the job over in between). False: not ours any more."""
    with Sessions() as s:
        if not job_store.lock_fenced(s, job.id, job.attempt):
            return False
        previous = None
        for src, dst in files:
            if src.is_file():
                _snapshot(src, dst)
                if dst.name == checkpoint_store.LAST and dst.parent.name == job.id:  # the job's own, not a copy below
                    previous = checkpoint_store.mirror_locked(s, job.id, dst)
        s.commit()
    checkpoint_store.drop(job.id, previous)
    return True



def _tree(attempt_dir: Path, job_dir: Path) -> list[tuple[Path, Path]]:
    return [(f, job_dir / f.relative_to(attempt_dir)) for f in sorted(attempt_dir.rglob("*"))
            if f.is_file() and not f.name.startswith(".")]  # fmt: skip


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
    if job.kind in READS_PRETRAIN_CHECKPOINT:
        assert job.source_job_id is not None
        config["checkpoint"] = str(job_workdir(settings, job.source_job_id) / "last.pt")
    return config


def input_paths(settings: Settings, job: ClaimedJob) -> dict[str, str]:
    """Server files an export or distill job reads: the pretrain ``last.pt`` and an eval's ``heads.pt``."""
    if job.kind == "export" and job.spec.get("source_kind") == "finetune":
        return {"checkpoint": str(job_workdir(settings, job.spec["source_job"]) / "finetuned.pt")}
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
    if job.kind in READS_PRETRAIN_CHECKPOINT:
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
    #: a checkpoint reported and not yet published as the job's
    checkpoint_pending: bool = False
    handback_sent: bool = False
    log_mirror: LogMirror | None = None


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
    job_dir = job_workdir(settings, job.id)
    job_dir.mkdir(parents=True, exist_ok=True)
    workdir = attempt_workdir(settings, job.id, job.attempt)
    if workdir.exists():  # left by a worker that died while preparing this very token: start clean
        shutil.rmtree(workdir, ignore_errors=True)
    # the folders of attempts this claim superseded (their worker died or stalled): decision 010
    if lost := remove_attempt_folders(settings, job.id, below=job.attempt):
        log.info("job %s: removed the folders of lost attempts %s", job.id, lost)
    config = run_config(settings, job)
    paths = input_paths(settings, job)
    try:
        checkpoint_store.fetch(Sessions, job.id, job_dir)  # another host's checkpoint (decision 018)
        for source in {job.source_job_id if job.kind in READS_PRETRAIN_CHECKPOINT else None, job.spec.get("pretrain_job")} - {None}:
            checkpoint_store.fetch(Sessions, source, job_workdir(settings, source))  # the source's last.pt, likewise
        checkpoint_store.fetch_inputs(Sessions, paths)  # an export's / distill's inputs (heads.pt, finetuned.pt, last.pt)
    except StoreUnavailable as e:
        with Sessions() as s:
            job_store.start_attempt(s, job, worker_name(), None, None)
        outcome = _store_fault(Sessions, job, e, None, publish, _backoff(settings))
        with Sessions() as s:
            job_store.end_attempt(s, job.id, job.attempt, outcome)
        return outcome
    resumed_from = _seed(job_dir, workdir)
    problem = _preflight(job, config, paths)
    dataset_source, dataset_problem = dataset_input(Sessions, job, config)
    problem = problem or dataset_problem
    if problem is not None:
        with Sessions() as s:
            job_store.start_attempt(s, job, worker_name(), None, None)
            job_store.finish(s, job.id, job.attempt, "failed", error=problem)
            job_store.end_attempt(s, job.id, job.attempt, "failed")
        shutil.rmtree(workdir, ignore_errors=True)
        return "failed"
    job_file = job_dir / f"attempt-{job.attempt}.json"
    job_file.write_text(
        json.dumps(
            {
                "kind": job.kind,
                "job_id": job.id,
                "source_job": job.source_job_id,
                "pretrain_job": job.spec.get("pretrain_job"),
                "source_kind": job.spec.get("source_kind"),
                "workdir": str(workdir),
                "config": config,
                "paths": paths,
                "export_bits": job.spec.get("export_bits", []),
                "dataset_source": dataset_source,
            }
        )
    )
    log_path = job_dir / f"attempt-{job.attempt}.log"

    read_fd, write_fd = os.pipe()
    lease_r, lease_w = os.pipe()
    os.set_blocking(lease_w, False)
    env = dict(os.environ, SSQL_EVENT_FD=str(write_fd), SSQL_LEASE_FD=str(lease_r), SSQL_SUPERVISOR_PID=str(os.getpid()),
               SSQL_HANDBACK_SECONDS=str(settings.handback_seconds), PYTHONUNBUFFERED="1")  # fmt: skip
    if settings.torch_threads > 0:
        threads = str(settings.torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.runner", str(job_file)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd, lease_r),
            start_new_session=True,
            preexec_fn=_arm_parent_death_signal,
            env=env,
        )
    os.close(write_fd)
    os.close(lease_r)
    events: queue.Queue = queue.Queue()
    threading.Thread(target=_read_events, args=(read_fd, events), daemon=True).start()
    state = AttemptState(log_mirror=LogMirror(job.id, job.attempt, log_path))
    try:
        with Sessions() as s:
            job_store.start_attempt(s, job, worker_name(), proc.pid, resumed_from)
        log.info("job %s attempt %d: runner pid %d%s", job.id, job.attempt, proc.pid, " (resuming)" if resumed_from else "")
        outcome = _watch(settings, Sessions, job, proc, events, state, lease_w, workdir, job_dir)
    finally:
        if proc.poll() is None:  # the supervisor itself failed: never leave the runner unsupervised
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
        os.close(lease_w)
    state.log_mirror.final()  # the runner is gone: its whole log, before the outcome is visible
    if outcome != "lease_lost" and state.checkpoint_pending:
        # the last checkpoint of a run that stops here (crashed, cancelled, handed back): the
        # next attempt resumes from it; a run that succeeded publishes everything below
        final_kind = (state.final or {}).get("event")
        if final_kind != "result" and not _publish_checkpoint(Sessions, job, state, workdir, job_dir):
            outcome = "lease_lost"
    if outcome == "lease_lost":
        with Sessions() as s:
            job_store.end_attempt(s, job.id, job.attempt, outcome)
        shutil.rmtree(workdir, ignore_errors=True)
        return outcome
    try:
        outcome = _record_outcome(settings, Sessions, job, proc.returncode, state, workdir, job_dir, log_path, publish)
    except Exception as e:  # noqa: BLE001 - never leave the job 'running' for the reaper to call it worker_lost
        log.exception("job %s attempt %d: recording the outcome failed", job.id, job.attempt)
        outcome = _record_failure(Sessions, job, proc.returncode, state, log_path, e)
    with Sessions() as s:
        job_store.end_attempt(s, job.id, job.attempt, outcome)
    shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _store_fault(Sessions: sessionmaker[Session], job: ClaimedJob, reason: object, progress: dict[str, Any] | None,
                 publish: Callable[[str], None], backoff_s: float) -> str:
    """The object store could not be reached: an infrastructure fault, not the job's. The job goes
    back to the queue with this attempt not spent, and is published again after ``backoff_s``
    (``SSQL_RECONCILE_SECONDS``, at most 30 s: this worker waits that long, as any job of a
    store-backed server needs the store), and so on until the store answers. The job's ``error``
    says why it waits; cancelling it works as for any queued job."""
    error = {"code": STORE_FAULT, "attempt": job.spent,
             "message": f"the object store could not be reached ({reason}); the job waits in the queue for it, "
                        "and this attempt is not counted against its attempts"}
    with Sessions() as s:
        handed = job_store.hand_back(s, job.id, job.attempt, progress=progress, error=error)
    log.warning("job %s attempt %d: object store unreachable (%s): back to the queue, attempt not spent", job.id, job.attempt, reason)
    if not handed:
        return "lease_lost"
    handback_requested.wait(backoff_s)  # cut short when the worker is asked to stop
    _publish_or_leave(Sessions, job, publish)
    return STORE_FAULT


def _backoff(settings: Settings) -> float:
    return min(settings.reconcile_seconds, 30.0)


def _publish_checkpoint(
    Sessions: sessionmaker[Session], job: ClaimedJob, state: AttemptState, workdir: Path, job_dir: Path
) -> bool:
    """Publish the runner's latest checkpoint as the job's; False when the lease is not ours."""
    pair = _publishable(workdir, job_dir, state.last_checkpoint)
    state.checkpoint_pending = False
    if pair is None:
        return True
    if publish_files(Sessions, job, [pair]):
        return True
    log.warning("job %s attempt %d: lease lost, checkpoint not published", job.id, job.attempt)
    return False


def _tell_lease(fd: int, deadline: float) -> None:
    """Tell the runner until when (``time.monotonic``) its lease holds; never block on it."""
    try:
        os.write(fd, f"{deadline:.3f}\n".encode())
    except (BlockingIOError, BrokenPipeError, OSError):
        pass


def _watch(
    settings: Settings,
    Sessions: sessionmaker[Session],
    job: ClaimedJob,
    proc: subprocess.Popen,
    events: queue.Queue,
    state: AttemptState,
    lease_fd: int,
    workdir: Path,
    job_dir: Path,
) -> str:
    """Pump events and heartbeats until the runner exits; returns "exited" or "lease_lost"."""
    progress_every = min(1.0, settings.heartbeat_seconds)
    last_flush = last_renewed = time.monotonic()
    last_beat = last_renewed - settings.heartbeat_seconds  # renew at once: the runner learns its deadline
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
                state.checkpoint_pending = True
            else:
                state.final = ev
            try:
                ev = events.get_nowait()
            except queue.Empty:
                ev = False
        now = time.monotonic()
        if handback_requested.is_set() and not state.handback_sent and proc.poll() is None:
            log.info("job %s attempt %d: worker stopping, asking the runner to stop at a checkpoint", job.id, job.attempt)
            state.handback_sent = True
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            deadline = now + settings.handback_seconds + settings.cancel_grace_seconds
            kill_at = deadline if kill_at is None else min(kill_at, deadline)
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
            if state.log_mirror is not None:
                state.log_mirror.tick()
            if cancel is not None and last_renewed == now:
                _tell_lease(lease_fd, now + settings.lease_seconds * RUNNER_LEASE_FRACTION)
                if state.checkpoint_pending:
                    try:
                        if not _publish_checkpoint(Sessions, job, state, workdir, job_dir):
                            cancel = None
                    except SQLAlchemyError:  # published with the next heartbeat
                        log.exception("job %s: publishing the checkpoint failed", job.id)
                        state.checkpoint_pending = True
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
    job_dir: Path,
    log_path: Path,
    publish: Callable[[str], None],
) -> str:
    final = state.final or {}
    kind = final.get("event")
    with Sessions() as s:
        if kind == "result" and rc == 0:
            # publish the attempt's files as the job's and record the outcome in one transaction,
            # holding the job row's lock: only the lease holder's files become the job's
            if not job_store.lock_fenced(s, job.id, job.attempt):
                log.warning("job %s attempt %d: finished after losing its lease; outputs dropped", job.id, job.attempt)
                return "lease_lost"
            for src, dst in _tree(workdir, job_dir):
                _snapshot(src, dst)
            records = collect_artifacts(job.kind, job_dir, settings.resolved_artifacts_dir(), final.get("outputs"), job.source_job_id)
            try:  # with a store, a success whose files it lacks would be one no other host can serve or resume
                previous = checkpoint_store.mirror_locked(s, job.id, job_dir / checkpoint_store.LAST, final=True)
                checkpoint_store.mirror_artifacts(records, settings.resolved_artifacts_dir())
            except StoreUnavailable as e:
                s.rollback()  # nothing recorded; the published files stay: the next attempt here resumes from them
                return _store_fault(Sessions, job, e, state.progress, publish, _backoff(settings))
            progress = dict(state.progress or {}, fraction=1.0, eta_s=0.0)
            summary = final.get("summary")
            if cost := throughput.cost_summary(s, job.id, job.kind, job.spec, summary):  # estimate vs actual
                summary = {**(summary or {}), "cost": cost}
            done = job_store.finish(
                s,
                job.id,
                job.attempt,
                "succeeded",
                summary=summary,
                results=final.get("results"),
                artifacts=records,
                progress=progress,
            )
            if done:
                checkpoint_store.drop(job.id, previous)
            if done and cost:
                try:
                    throughput.record_throughput(s, cost)
                except SQLAlchemyError:  # a record lost is no reason to doubt the job's outcome
                    log.warning("job %s: could not record the device's throughput", job.id, exc_info=True)
            return "succeeded" if done else "lease_lost"
        cancel_requested, max_attempts = job_store.job_flags(s, job.id)
        if kind == "cancelled" or (rc < 0 and cancel_requested and not state.handback_sent):
            job_store.finish(s, job.id, job.attempt, "cancelled", error=None, progress=state.progress)
            return "cancelled"
        if kind == "error" and final.get("code") == STORE_FAULT:  # the runner could not fetch its dataset
            s.rollback()
            return _store_fault(Sessions, job, final.get("message", "unreachable"), state.progress, publish, _backoff(settings))
        if kind == "error" and not final.get("retryable", False):
            error = {k: final[k] for k in ("code", "message", "field") if k in final}
            job_store.finish(s, job.id, job.attempt, "failed", error=error, progress=state.progress)
            return "failed"
        if state.handback_sent:
            # the worker is stopping (not the job's fault): back to the queue, attempt not spent;
            # its last checkpoint is published, another worker resumes from it
            if job_store.hand_back(s, job.id, job.attempt, progress=state.progress):
                _publish_or_leave(Sessions, job, publish)
                return "handed_back"
            return "lease_lost"
        detail = final.get("message") or _log_tail(log_path)
        message = f"training process {_describe_exit(rc)}" + (f": {detail}" if detail else "")
        error = {"code": "crashed", "message": message, "attempt": job.spent}
        if job.spent < max_attempts:
            if job_store.requeue(s, job.id, job.attempt, error):
                _publish_or_leave(Sessions, job, publish)
            return "requeued"
        error["message"] += f" (gave up after {job.spent} attempts)"
        job_store.finish(s, job.id, job.attempt, "failed", error=error, progress=state.progress)
        return "failed"


def _publish_or_leave(Sessions: sessionmaker[Session], job: ClaimedJob, publish: Callable[[str], None]) -> None:
    """Send the job's message again; if the broker is away the row stays queued and unpublished,
    and a reconciler publishes it."""
    try:
        publish(job.id)
    except Exception:  # noqa: BLE001 - the reconciler's job then
        log.exception("job %s: could not publish it again; the reconciler will", job.id)
        return
    with Sessions() as s:
        job_store.mark_published(s, [job.id])


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
