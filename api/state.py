"""Process-wide objects of the API, created in the app's lifespan and reached through deps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.fast_reads import HotReads
from persistence.settings import Settings

#: the longest a cached key lives while revocations are not pushed to this process (SQLite, or
#: the Postgres LISTEN connection down): a revoked key is refused within this many seconds, by
#: whatever path it was revoked (decision 014: one second, as on Postgres with the listener)
UNPUSHED_TTL_S = 1.0
#: unknown keys are remembered briefly so a bad client cannot hammer the database
NEGATIVE_TTL_S = 5.0


@dataclass
class KeyCache:
    """key hash -> owner id: auth costs a dict lookup, not a query.

    Revocation (docs/decisions/011): :meth:`forget` drops a key at once (the revoking API
    process calls it, and every process calls it when Postgres notifies a revocation). Positive
    entries live ``ttl`` seconds while revocations are pushed (``listening``), else at most
    :data:`UNPUSHED_TTL_S`. ``generation`` changes on every forget: a lookup that started before a
    revocation does not cache its (stale) answer.
    """

    ttl: float
    entries: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    listening: bool = False
    generation: int = 0

    def get(self, key_hash: str) -> tuple[bool, int | None]:
        hit = self.entries.get(key_hash)
        if hit is None or hit[1] < time.monotonic():
            return False, None
        return True, hit[0]

    def put(self, key_hash: str, owner_id: int | None, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return  # a revocation arrived while this answer was read: it may be stale
        if len(self.entries) > 100_000:
            self.entries.clear()
        ttl = self.ttl if self.listening else min(self.ttl, UNPUSHED_TTL_S)
        if owner_id is None:
            ttl = min(ttl, NEGATIVE_TTL_S)
        self.entries[key_hash] = (owner_id, time.monotonic() + ttl)

    def forget(self, key_hash: str) -> None:
        """A key was revoked (or changed, or deleted): refuse it from the next request on. ``*``
        (the api_keys table was truncated): forget every key."""
        self.generation += 1
        if key_hash == "*":
            self.entries.clear()
        else:
            self.entries.pop(key_hash, None)

    def set_listening(self, listening: bool) -> None:
        """Revocations start or stop being pushed: forget everything (some may have been missed)."""
        self.generation += 1
        self.listening = listening
        self.entries.clear()


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    celery: Celery
    keys: KeyCache
    reads: HotReads
