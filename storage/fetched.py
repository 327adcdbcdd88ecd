"""The API's copies of registered files it fetched from the store to serve them itself (a
download without redirect of a file written on another host; decision 018).

Content-addressed (``<root>/<sha256>``: the same bytes are fetched once for every job that
registered them), bounded by ``max_bytes`` with least-recently-served eviction (``<sha256>.used``
is touched at each serve), and safe across the API's processes: a per-digest ``flock`` makes a
second request wait for the first one's download. A copy served within ``grace_seconds`` is never
evicted, so a response that has just been handed its path still opens it; an evicted copy costs
only a fetch again.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from storage.base import ObjectStore
from storage.cache import locked

USED = ".used"


class FetchedCopies:
    def __init__(self, root: Path, max_bytes: int, grace_seconds: float = 600.0) -> None:
        self.root, self.max_bytes, self.grace_seconds = root, max_bytes, grace_seconds

    def path(self, store: ObjectStore, key: str, sha256: str) -> Path:
        """The verified local copy of ``key`` (fetched now unless this host has it; after a fetch,
        others beyond the bound are evicted). Raises what ``store.get_file`` raises (missing, mismatch, down)."""
        path = self.root / sha256
        with locked(self.root / f"{sha256}.lock"):
            fetched = not path.is_file()
            if fetched:
                store.get_file(key, path, sha256)
            (self.root / f"{sha256}{USED}").touch()
        if fetched:  # only a fetch grows the folder: a serve of a copy it has scans nothing
            self.evict(keep=sha256)
        return path

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently served copies until the rest fit ``max_bytes`` (never
        ``keep``, one served within the grace period, or one another process is writing)."""
        if not self.root.is_dir():
            return []
        entries = []
        for f in self.root.iterdir():
            if f.is_file() and len(f.name) == 64 and "." not in f.name:
                used = self.root / f"{f.name}{USED}"
                entries.append((used.stat().st_mtime if used.exists() else 0.0, f, f.stat().st_size))
        total = sum(size for _, _, size in entries)
        now, removed = time.time(), []
        for used_at, f, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if f.name == keep or now - used_at < self.grace_seconds:
                continue
            with open(self.root / f"{f.name}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    f.unlink(missing_ok=True)
                    (self.root / f"{f.name}{USED}").unlink(missing_ok=True)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            total -= size
            removed.append(f.name)
        return removed
