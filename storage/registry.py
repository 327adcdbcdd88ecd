"""Backends by URI scheme: ``file://`` (a local folder) and ``s3://bucket/prefix`` (any S3-compatible store)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from storage.base import ObjectStore

if TYPE_CHECKING:
    from persistence.settings import Settings

_SCHEMES: dict[str, Callable[..., ObjectStore]] = {}


def register_scheme(scheme: str, factory: Callable[..., ObjectStore]) -> None:
    """Make ``open_store`` build ``factory(url, **options)`` for URLs of ``scheme``."""
    _SCHEMES[scheme] = factory


def open_store(url: str, **options: Any) -> ObjectStore:
    scheme = urlsplit(url).scheme or "file"
    if scheme not in _SCHEMES:
        _load_builtin(scheme)
    if scheme not in _SCHEMES:
        raise ValueError(f"no object store for scheme {scheme!r} (known: {sorted(_SCHEMES)}) in {url!r}")
    return _SCHEMES[scheme](url, **options)


def _load_builtin(scheme: str) -> None:
    # imported on first use: boto3 is a heavy import that an embedded install never needs
    if scheme == "file":
        from storage.local import LocalStore

        register_scheme("file", LocalStore)
    elif scheme == "s3":
        from storage.s3 import S3Store

        register_scheme("s3", S3Store)


_cache: dict[tuple, ObjectStore] = {}


def store_for(settings: Settings) -> ObjectStore:
    """The store of this server's settings (``SSQL_STORAGE_URL``; default ``SSQL_HOME/store``), one per process."""
    url = settings.resolved_storage_url()
    options = settings.storage_options() if url.startswith("s3://") else {}
    key = (url, tuple(sorted(options.items())))
    if key not in _cache:
        _cache[key] = open_store(url, **options)
    return _cache[key]
