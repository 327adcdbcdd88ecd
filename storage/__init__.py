"""Where the service keeps files that outlive a process: one abstract object store with a local-folder
and an S3-compatible backend, chosen by URI scheme (docs/decisions/018).

Used by ``api`` and ``worker``; ``ssql_core`` never imports it (it works on local paths only).
"""

from storage.base import DigestMismatch, ObjectStore, StoreUnavailable, sha256_file
from storage.registry import open_store, register_scheme, store_for

__all__ = ["DigestMismatch", "ObjectStore", "StoreUnavailable", "open_store", "register_scheme", "sha256_file", "store_for"]
