"""A worker's local cache of datasets fetched from the store: ``<cache>/<sha256>/{train,val}/...``.

Content-addressed (the archive's sha256 names the folder, so two owners' identical archives share
it), size-bounded with least-recently-used eviction (a folder's ``.used`` file is touched at each
use; a dataset a job has pinned is never evicted), and safe for concurrent jobs on one host: a per-digest ``flock`` makes the second job wait
for the first one's download instead of downloading again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.archives import Limits, extract
from storage.base import ObjectStore

COMPLETE = ".complete"
USED = ".used"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the block: one writer per digest on a host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class DatasetCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes

    def folder(self, sha256: str) -> Path:
        return self.root / sha256

    def pin(self, sha256: str) -> object:
        """Hold a shared lock on the dataset while a job reads it (keep the returned file open):
        eviction skips pinned datasets."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / f"{sha256}.inuse", "a")  # noqa: SIM115 - held for the job's life
        fcntl.flock(f, fcntl.LOCK_SH)
        return f

    def ensure(self, store: ObjectStore, key: str, sha256: str, fmt: str, limits: Limits = Limits()) -> tuple[Path, bool]:
        """The extracted dataset of ``key`` (verified against ``sha256``); (folder, downloaded now?)."""
        folder = self.folder(sha256)
        with locked(self.root / f"{sha256}.lock"):
            if (folder / COMPLETE).is_file():
                (folder / USED).touch()
                return folder, False
            shutil.rmtree(folder, ignore_errors=True)  # a half extraction of a crashed worker
            tmp = self.root / f".{sha256}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                archive = store.get_file(key, tmp / "archive", sha256)
                extract(archive, fmt, tmp / "data", limits)
                archive.unlink()
                (tmp / "data" / COMPLETE).touch()
                (tmp / "data" / USED).touch()
                os.replace(tmp / "data", folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=sha256)
        return folder, True

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used datasets until the cache fits ``max_bytes`` (never ``keep``,
        never one being written: only complete folders whose lock is free)."""
        entries = []
        for d in self.root.iterdir() if self.root.is_dir() else ():
            if d.is_dir() and not d.name.startswith(".") and (d / COMPLETE).is_file():
                used = (d / USED).stat().st_mtime if (d / USED).exists() else 0.0
                entries.append((used, d, _size(d)))
        total = sum(s for _, _, s in entries)
        removed = []
        for _, d, s in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if d.name == keep:
                continue
            lock = self.root / f"{d.name}.inuse"
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    (d / COMPLETE).unlink(missing_ok=True)
                    shutil.rmtree(d, ignore_errors=True)
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            total -= s
            removed.append(d.name)
        return removed


