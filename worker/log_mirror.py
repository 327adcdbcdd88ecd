"""An attempt's log copied to the object store while it grows (decision 018), so that an API on
another host shows it: with ``SSQL_STORAGE_URL`` set, every ``SSQL_LOG_MIRROR_SECONDS`` (in a
thread, never holding the heartbeat loop) and once more when the attempt ends.

The object (``logs/<job>/attempt-<n>.log``) is replaced whole by one PUT, so a reader sees one
complete version. A log above :data:`MAX_MIRRORED_BYTES` is kept as its last bytes after a line
saying how many were left out (the API shows no more than that of a log anyway). A store that
cannot be reached costs the copy, never the attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from persistence.settings import get_settings
from storage import StoreUnavailable, store_for
from storage.keys import log_key

log = logging.getLogger("ssql.worker")
MAX_MIRRORED_BYTES = 4 << 20


def _payload(path: Path) -> bytes | None:
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            start = max(0, size - MAX_MIRRORED_BYTES)
            f.seek(start)
            data = f.read()
    except OSError:
        return None
    if start:
        cut = data.find(b"\n") + 1  # from a line's start
        data = f"[... {start + cut} earlier bytes not kept in the store ...]\n".encode() + data[cut:]
    return data


class LogMirror:
    def __init__(self, job_id: str, attempt: int, path: Path) -> None:
        self.key, self.path = log_key(job_id, attempt), path
        self.every = get_settings().log_mirror_seconds
        self.enabled = get_settings().storage_url is not None
        self._last = 0.0
        self._size = -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _copy(self) -> None:
        with self._lock:
            try:
                size = self.path.stat().st_size
            except OSError:
                return
            if size == self._size:
                return
            data = _payload(self.path)
            if data is None:
                return
            try:
                store_for(get_settings()).put_bytes(self.key, data)
                self._size = size
            except StoreUnavailable as e:
                log.warning("log %s not copied to the store (%s)", self.key, e)

    def tick(self) -> None:
        """From the heartbeat loop: start a copy when one is due and none is running."""
        now = time.monotonic()
        if not self.enabled or now - self._last < self.every or (self._thread is not None and self._thread.is_alive()):
            return
        self._last = now
        self._thread = threading.Thread(target=self._copy, name="ssql-log-mirror", daemon=True)
        self._thread.start()

    def final(self) -> None:
        """The attempt ended: its whole log, now (waits for a copy still running)."""
        if not self.enabled:
            return
        if self._thread is not None:
            self._thread.join()
        self._copy()
