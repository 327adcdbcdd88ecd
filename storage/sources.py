"""Datasets registered from data already in an S3 bucket (decision 018): ``s3://bucket/prefix/`` an
image folder, ``s3://bucket/key.zip`` (``.tar``, ``.tar.gz``, ``.tgz``) an archive.

Both become the archive an upload would have been (a folder is packed into a deterministic tar:
sorted names, zero times and owners, so the same folder gives the same bytes and the same
sha256), which is then checked by :func:`storage.archives.inspect` and stored content-addressed
like an upload. The copy makes the dataset immutable: what a job reads is what was validated,
whatever happens to the user's objects afterwards. Read with the store's endpoint and credentials.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.archives import Limits

#: an archive's key ends in one of these (else the URI names a folder)
ARCHIVE_SUFFIXES = (("tar.gz", ".tar.gz"), ("tar.gz", ".tgz"), ("zip", ".zip"), ("tar", ".tar"))
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
#: objects up to this size are fetched several at a time; larger ones streamed one by one
_SMALL = 8 << 20
_PARALLEL = 8


class SourceError(ValueError):
    """The URI cannot be used: malformed, not allowed, or nothing readable there (a 422 on ``uri``,
    or the ``error`` of an invalid dataset once validation found it)."""


@dataclass(frozen=True)
class Source:
    bucket: str
    #: the archive's key, or the folder's prefix ("" or ending in "/")
    key: str
    #: "folder", or the archive's format ("zip", "tar", "tar.gz")
    fmt: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse(uri: str) -> Source:
    """The source a URI names; :class:`SourceError` says what is wrong with it."""
    if not isinstance(uri, str) or len(uri) > 1024 or not uri.isprintable():
        raise SourceError("must be a printable s3:// URI of at most 1024 characters")
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise SourceError(f"must be s3://bucket/prefix/ (an image folder) or s3://bucket/key.zip|.tar|.tar.gz (an archive), got {uri!r}")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise SourceError(f"must be s3://bucket/key with no port, user, query or fragment, got {uri!r}")
    if not _BUCKET.match(parts.netloc):
        raise SourceError(f"{parts.netloc!r} is not an S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')")
    key = parts.path.lstrip("/")
    for fmt, suffix in ARCHIVE_SUFFIXES:
        if key.lower().endswith(suffix) and len(key) > len(suffix):
            return Source(parts.netloc, key, fmt)
    if key and not key.endswith("/"):
        key += "/"
    return Source(parts.netloc, key, "folder")


def check_allowed(source: Source, allowed: set[str], store_url: str) -> None:
    """Refuse a bucket the operator did not list (``SSQL_DATASET_URI_BUCKETS``) and anything inside
    the service's own store (other owners' datasets and checkpoints live there)."""
    if "*" not in allowed and source.bucket not in allowed:
        which = ", ".join(sorted(allowed)) if allowed else "none (the operator sets SSQL_DATASET_URI_BUCKETS)"
        raise SourceError(f"bucket {source.bucket!r} is not one this server registers datasets from; allowed: {which}")
    store = urlsplit(store_url)
    if store.scheme == "s3" and store.netloc == source.bucket:
        prefix = store.path.strip("/")
        if not prefix or source.key == prefix or source.key.startswith(prefix + "/") or prefix.startswith(source.key.rstrip("/")):
            raise SourceError(f"{source.uri} is inside (or above) the service's own store {store_url}: upload the data instead")


def _boto_errors() -> tuple[type[Exception], ...]:
    # imported on use: boto3 is a heavy import an embedded install never needs
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _refusal(e: Exception, source: Source) -> Exception:
    """A client error as what the user can act on: a missing bucket or object, no access."""
    from botocore.exceptions import ClientError

    from storage.s3 import _translate

    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code")
        if code in ("NoSuchBucket",):
            return SourceError(f"bucket {source.bucket!r} does not exist")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return SourceError(f"bucket {source.bucket!r} cannot be read with the server's credentials ({code})")
        if code in ("404", "NoSuchKey", "NotFound"):
            return SourceError(f"no object {source.uri}")
    return _translate(e)


def probe(client: Any, source: Source) -> int | None:
    """A cheap look before the request is answered: the archive's size, or None for a folder with
    at least one object. :class:`SourceError` when there is nothing readable there;
    :class:`storage.StoreUnavailable` when the store cannot be reached."""
    try:
        if source.fmt != "folder":
            return int(client.head_object(Bucket=source.bucket, Key=source.key)["ContentLength"])
        listed = client.list_objects_v2(Bucket=source.bucket, Prefix=source.key, MaxKeys=1)
    except _boto_errors() as e:
        raise _refusal(e, source) from e
    if not listed.get("KeyCount"):
        raise SourceError(f"no objects under {source.uri}")
    return None


def _objects(client: Any, source: Source) -> Iterator[tuple[str, int]]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.key):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):  # a folder marker of the console
                yield o["Key"], int(o["Size"])


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def fetch(client: Any, source: Source, dest: Path, limits: Limits, max_bytes: int) -> tuple[str, str, int]:
    """Write the source as one archive at ``dest``: (format, sha256, bytes). An archive is copied
    (at most ``max_bytes``); a folder packed into a tar (at most ``limits.max_entries`` objects and
    ``limits.max_unpacked_bytes`` bytes, a tar of at most ``max_bytes``)."""
    try:
        if source.fmt != "folder":
            return source.fmt, *_copy(client, source, dest, max_bytes)
        return "tar", *_pack(client, source, dest, limits, max_bytes)
    except _boto_errors() as e:
        raise _refusal(e, source) from e


def _copy(client: Any, source: Source, dest: Path, max_bytes: int) -> tuple[str, int]:
    body = client.get_object(Bucket=source.bucket, Key=source.key)["Body"]
    with open(dest, "wb") as f:
        out = _Hashing(f)
        while chunk := body.read(1 << 20):
            out.write(chunk)
            if out.n > max_bytes:
                raise SourceError(f"{source.uri} is larger than {max_bytes} bytes (the server's SSQL_MAX_UPLOAD_BYTES)")
    return out.h.hexdigest(), out.n


def _pack(client: Any, source: Source, dest: Path, limits: Limits, max_bytes: int) -> tuple[str, int]:
    objects = sorted(_objects(client, source))
    if not objects:
        raise SourceError(f"no objects under {source.uri}")
    if len(objects) > limits.max_entries:
        raise SourceError(f"more than {limits.max_entries} objects under {source.uri} (the server's SSQL_DATASET_MAX_ENTRIES)")
    total = sum(size for _, size in objects)
    if total > limits.max_unpacked_bytes:
        raise SourceError(f"{total} bytes under {source.uri}: above SSQL_DATASET_MAX_UNPACKED_BYTES ({limits.max_unpacked_bytes})")
    packed = total + 1024 * (len(objects) + 2)  # a tar header and padding per file, at most
    if packed > max_bytes:
        raise SourceError(f"about {packed} bytes once packed, above {max_bytes} (the server's SSQL_MAX_UPLOAD_BYTES)")

    def read(key: str) -> bytes:
        return client.get_object(Bucket=source.bucket, Key=key)["Body"].read()

    with open(dest, "wb") as f, ThreadPoolExecutor(_PARALLEL) as pool:
        out = _Hashing(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            batch: list[tuple[str, int]] = []

            def flush() -> None:
                for (key, _), data in zip(batch, pool.map(read, [k for k, _ in batch]), strict=True):
                    tf.addfile(_tar_info(key[len(source.key):], len(data)), io.BytesIO(data))
                batch.clear()

            for key, size in objects:
                if size > _SMALL:
                    flush()
                    body = client.get_object(Bucket=source.bucket, Key=key)["Body"]
                    tf.addfile(_tar_info(key[len(source.key):], size), body)
                    continue
                batch.append((key, size))
                if len(batch) >= 4 * _PARALLEL:
                    flush()
            flush()
        if out.n > max_bytes:
            raise SourceError(f"{out.n} bytes once packed, above {max_bytes} (the server's SSQL_MAX_UPLOAD_BYTES)")
    return out.h.hexdigest(), out.n
