"""The API's hot reads (key -> owner, job status by id) on a raw asyncpg pool when on Postgres.

A status poll is the most frequent request by far; through the SQLAlchemy asyncio layer it costs
several times a bare asyncpg query (greenlet hops, result processing). These two statements are
prepared once per connection and run straight on asyncpg. On SQLite (embedded mode) the same
functions run through SQLAlchemy; the answers are identical.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from persistence import api_store
from persistence.settings import Settings

_JOB_SQL = (
    "SELECT id, kind, status, spec, source_job_id, attempts, max_attempts, cancel_requested, progress, summary,"
    " error, created_at, updated_at, started_at, finished_at FROM jobs WHERE id = $1 AND owner_id = $2"
)
_KEY_SQL = "SELECT user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"


class HotReads(Protocol):
    async def owner_for_key(self, key_hash: str) -> int | None: ...
    async def get_job(self, owner_id: int, job_id: str) -> dict[str, Any] | None: ...
    async def close(self) -> None: ...


class AsyncpgReads:
    """Prepared statements on a dedicated asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, settings: Settings, min_size: int = 4, max_size: int = 20) -> AsyncpgReads:
        import asyncpg

        dsn = "postgresql://" + settings.sync_database_url().split("://", 1)[1]

        async def init(conn: Any) -> None:
            for name in ("json", "jsonb"):
                await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")

        async def keep_session(_conn: Any) -> None:
            """Skip asyncpg's reset round trip on release: these connections only ever run the
            two read-only statements below, outside transactions, so there is no state to reset."""

        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=init, reset=keep_session, statement_cache_size=16
        )
        return cls(pool)

    async def owner_for_key(self, key_hash: str) -> int | None:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(_KEY_SQL, key_hash)

    async def get_job(self, owner_id: int, job_id: str) -> dict[str, Any] | None:
        if not api_store.is_job_id(job_id):
            return None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_JOB_SQL, job_id, owner_id)
        return None if row is None else dict(row)

    async def close(self) -> None:
        await self.pool.close()


class SqlAlchemyReads:
    """The same reads through the SQLAlchemy asyncio engine (SQLite, or any other database)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def owner_for_key(self, key_hash: str) -> int | None:
        async with self.engine.connect() as conn:
            return await api_store.owner_for_key(conn, key_hash)

    async def get_job(self, owner_id: int, job_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = await api_store.get_job(conn, owner_id, job_id)
        return None if row is None else dict(row)

    async def close(self) -> None:
        return None


async def make_hot_reads(settings: Settings, engine: AsyncEngine) -> HotReads:
    if settings.async_database_url().startswith("postgresql+asyncpg"):
        return await AsyncpgReads.connect(settings)
    return SqlAlchemyReads(engine)
