"""Process-wide objects of the API, created in the app's lifespan and reached through deps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.fast_reads import HotReads
from persistence.settings import Settings


@dataclass
class KeyCache:
    """key hash -> owner id, for ``ttl`` seconds: auth costs a dict lookup, not a query."""

    ttl: float
    entries: dict[str, tuple[int | None, float]] = field(default_factory=dict)

    def get(self, key_hash: str) -> tuple[bool, int | None]:
        hit = self.entries.get(key_hash)
        if hit is None or hit[1] < time.monotonic():
            return False, None
        return True, hit[0]

    def put(self, key_hash: str, owner_id: int | None) -> None:
        if len(self.entries) > 100_000:
            self.entries.clear()
        # unknown keys are remembered briefly so a bad client cannot hammer the database
        ttl = self.ttl if owner_id is not None else min(self.ttl, 5.0)
        self.entries[key_hash] = (owner_id, time.monotonic() + ttl)


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    celery: Celery
    keys: KeyCache
    reads: HotReads
