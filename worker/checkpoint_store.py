"""A job's ``last.pt`` mirrored in the object store, so that an attempt on another host resumes
from it (decision 018). Only with an explicit ``SSQL_STORAGE_URL``: the embedded default keeps the
store and the artifacts on one disk, where the published file itself is what a retry reads.

Content-addressed (``jobs/<id>/last-<sha256>.pt``): an object is never overwritten, so a reader
cannot see a half-replaced one; its digest is recorded in ``jobs.checkpoint_sha256`` in the same
fenced transaction that publishes the file locally (only the lease holder writes it), and the
previous object is removed after the commit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from persistence.models import Job
from persistence.settings import Settings, get_settings
from storage import DigestMismatch, StoreUnavailable, sha256_file, store_for
from storage.keys import artifact_key

log = logging.getLogger("ssql.worker")
LAST = "last.pt"


def mirroring(settings: Settings | None = None) -> bool:
    return (settings or get_settings()).storage_url is not None


def object_key(job_id: str, sha256: str) -> str:
    return f"jobs/{job_id}/last-{sha256}.pt"


#: after a mirror met an unreachable store, checkpoints published before this (time.monotonic)
#: are not mirrored (each try would hold the heartbeat loop for the client's retries)
_store_down_until = 0.0
STORE_BACKOFF_S = 10.0


def mirror_locked(session: Session, job_id: str, path: Path, final: bool = False) -> str | None:
    """Put ``path`` (the job's just-published last.pt) in the store and record its digest, inside
    the caller's fenced transaction; returns the previous digest (to delete after the commit). A
    store that cannot be reached costs a checkpoint's mirror, never the local publish; the
    ``final`` one (at success) raises :class:`StoreUnavailable` instead."""
    global _store_down_until
    if not mirroring() or not path.is_file() or (not final and time.monotonic() < _store_down_until):
        return None
    previous = session.execute(select(Job.checkpoint_sha256).where(Job.id == job_id)).scalar_one_or_none()
    digest = sha256_file(path)
    if digest == previous:
        return None
    try:
        written = store_for(get_settings()).put_file(object_key(job_id, digest), path)
    except StoreUnavailable as e:
        _store_down_until = time.monotonic() + STORE_BACKOFF_S
        if final:
            raise
        log.warning("job %s: last.pt not mirrored to the store (%s); next try in %g s", job_id, e, STORE_BACKOFF_S)
        return None
    if written != digest:  # the file changed under us: record nothing
        return None
    session.execute(update(Job).where(Job.id == job_id).values(checkpoint_sha256=digest))
    return previous


def mirror_artifacts(records: list, artifacts_root: Path) -> int:
    """Put every file a finished job registered (downloads and the inputs later jobs read) in the
    store by its sha256, so an API on another host can serve it; returns how many were put.
    Raises :class:`StoreUnavailable` when the store cannot be reached: the caller does not record
    the success (an API elsewhere could never serve the files) and hands the job back."""
    if not mirroring():
        return 0
    store, put = store_for(get_settings()), 0
    for r in records:
        if not store.exists(artifact_key(r.sha256)):
            store.put_file(artifact_key(r.sha256), artifacts_root / r.path, r.sha256)
            put += 1
    return put


def fetch_inputs(Sessions: sessionmaker[Session], paths: dict[str, str]) -> list[str]:
    """Make the files a job reads from other jobs (``input_paths``: a pretrain's ``last.pt``, an
    eval's ``heads.pt``, a finetune's ``finetuned.pt``, each at ``.../jobs/<job>/<name>``) the ones
    registered when their job succeeded: a host that lacks one, or holds another, downloads it from
    ``artifacts/<sha256>`` (verified). Returns the names fetched."""
    from persistence.api_store import INPUT_FORMAT
    from persistence.models import Artifact

    if not mirroring():
        return []
    fetched = []
    for path in map(Path, paths.values()):
        with Sessions() as s:
            digest = s.execute(select(Artifact.sha256).where(Artifact.job_id == path.parent.name, Artifact.format == INPUT_FORMAT,
                                                             Artifact.bits == path.name)).scalar_one_or_none()
        if not digest or (path.is_file() and sha256_file(path) == digest):
            continue
        try:
            store_for(get_settings()).get_file(artifact_key(digest), path, digest)
        except (DigestMismatch, FileNotFoundError) as e:
            log.error("input %s not fetched from the store: %s", path, e)
            continue
        fetched.append(path.name)
    return fetched


def drop(job_id: str, digest: str | None) -> None:
    if not digest:
        return
    try:
        store_for(get_settings()).delete(object_key(job_id, digest))
    except StoreUnavailable as e:
        log.warning("job %s: old checkpoint object not removed (%s)", job_id, e)


def fetch(Sessions: sessionmaker[Session], job_id: str, job_dir: Path) -> bool:
    """Make ``job_dir/last.pt`` the job's latest mirrored checkpoint: before seeding an attempt of
    the job, or before a job reads its source's. A host that lacks the file, or holds an older one
    (an earlier attempt ran there), downloads it, verified against its recorded digest; True when
    it did. A mismatching object is refused (the local file, if any, stays)."""
    if not mirroring():
        return False
    with Sessions() as s:
        digest = s.execute(select(Job.checkpoint_sha256).where(Job.id == job_id)).scalar_one_or_none()
    if not digest or ((job_dir / LAST).is_file() and sha256_file(job_dir / LAST) == digest):
        return False
    try:
        store_for(get_settings()).get_file(object_key(job_id, digest), job_dir / LAST, digest)
    except DigestMismatch as e:
        log.error("job %s: refused the stored checkpoint: %s", job_id, e)
        return False
    log.info("job %s: fetched last.pt (sha256 %s) from the store", job_id, digest)
    return True
