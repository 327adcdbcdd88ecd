"""The object store interface every backend implements (the MLflow artifact-repository shape).

Objects are addressed by a relative key (``datasets/<owner>/<sha256>.zip``). A write returns the
object's sha256, which the caller records in Postgres; a read names the digest it expects and
refuses an object that does not match it, so nothing corrupt is ever handed to a job.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path

CHUNK = 1 << 20


class StoreUnavailable(Exception):
    """The store could not be reached (network, credentials, endpoint down): retrying may help."""


class DigestMismatch(Exception):
    """An object read from the store is not the one that was written (its sha256 differs)."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"object {key!r} has sha256 {actual}, expected {expected}: refused")
        self.key, self.expected, self.actual = key, expected, actual


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated and never climb (a backend maps them under its root)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object key {key!r}")
    return key


class ObjectStore(ABC):
    """One backend. ``url`` is what it was opened with (``file:///srv/ssql/store``, ``s3://bucket/prefix``)."""

    url: str

    @abstractmethod
    def put_file(self, key: str, path: Path, sha256: str | None = None) -> str:
        """Store the local file ``path`` under ``key`` (atomically: readers see the old object or
        the whole new one); returns its sha256 (``sha256``: the caller hashed the file already,
        e.g. as it streamed in; a backend that copies locally still hashes the copy)."""

    @abstractmethod
    def _download(self, key: str, dest: Path) -> None:
        """Copy the object to ``dest`` (a temporary name the caller renames)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (no error when it is already gone)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot take writes now (a cheap probe,
        made before an upload is accepted)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; FileNotFoundError when there is none."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of the object from ``start`` (b"" past its end); FileNotFoundError when there is none."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Replace a small object whole, atomically (logs: not content-addressed, no digest kept)."""

    def presigned_url(self, key: str, expires_s: int, method: str = "GET", filename: str | None = None) -> str | None:
        """A URL that reads the object without credentials for a while; None where the backend has none."""
        return None

    def get_file(self, key: str, dest: Path, sha256: str) -> Path:
        """Download ``key`` to ``dest``, verified: a mismatching object raises :class:`DigestMismatch`
        and leaves nothing at ``dest``."""
        check_key(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            self._download(key, tmp)
            actual = sha256_file(tmp)
            if actual != sha256:
                raise DigestMismatch(key, sha256, actual)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest
