"""The API's hot reads (key -> owner, job status by id) on a raw asyncpg pool when on Postgres.

A status poll is the most frequent request by far; through the SQLAlchemy asyncio layer it costs
several times a bare asyncpg query (greenlet hops, result processing). These two statements are
prepared once per connection and run straight on asyncpg. On SQLite (embedded mode) the same
functions run through SQLAlchemy; the answers are identical.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from persistence import api_store
from persistence.keys import REVOKED_CHANNEL
from persistence.settings import Settings

log = logging.getLogger("ssql.api")

#: how often the LISTEN connection is pinged (a dead one is noticed within about twice this)
LISTEN_PING_S = 2.0

_JOB_SQL = (
    "SELECT id, kind, status, spec, source_job_id, attempts, max_attempts, cancel_requested, progress, summary,"
    " error, created_at, updated_at, started_at, finished_at, name, tags, notes, priority FROM jobs WHERE id = $1 AND owner_id = $2"
)
_KEY_SQL = "SELECT user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"


class HotReads(Protocol):
    async def owner_for_key(self, key_hash: str) -> int | None: ...
    async def get_job(self, owner_id: int, job_id: str) -> dict[str, Any] | None: ...
    def watch_revocations(self, on_revoked: Callable[[str], None], on_listening: Callable[[bool], None]) -> None: ...
    async def close(self) -> None: ...


class AsyncpgReads:
    """Prepared statements on a dedicated asyncpg pool."""

    def __init__(self, pool: Any, dsn: str | None = None) -> None:
        self.pool = pool
        self.dsn = dsn
        self._watcher: asyncio.Task[None] | None = None

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

        def pool(size: int) -> Any:
            return asyncpg.create_pool(dsn, min_size=size, max_size=max_size, init=init, reset=keep_session,
                                       statement_cache_size=16)  # fmt: skip

        try:
            return cls(await pool(min_size), dsn)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            # the database is away at startup: start anyway (requests answer 503 until it is back,
            # /readyz says why) with a pool that connects on demand
            log.warning("database unreachable at startup (%s: %s); connecting on demand", type(e).__name__, e)
            return cls(await pool(0), dsn)

    async def owner_for_key(self, key_hash: str) -> int | None:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(_KEY_SQL, key_hash)

    async def get_job(self, owner_id: int, job_id: str) -> dict[str, Any] | None:
        if not api_store.is_job_id(job_id):
            return None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_JOB_SQL, job_id, owner_id)
        return None if row is None else dict(row)

    def watch_revocations(self, on_revoked: Callable[[str], None], on_listening: Callable[[bool], None]) -> None:
        """LISTEN for key revocations on a connection of its own (reconnecting), calling
        ``on_revoked(key_hash)`` per notification and ``on_listening(bool)`` when the connection
        comes up or goes down (then revocations may have been missed)."""
        if self.dsn is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(on_revoked, on_listening))

    async def _watch(self, on_revoked: Callable[[str], None], on_listening: Callable[[bool], None]) -> None:
        import asyncpg

        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                await conn.add_listener(REVOKED_CHANNEL, lambda _c, _pid, _ch, payload: on_revoked(payload))
                on_listening(True)
                while not conn.is_closed():
                    await asyncio.sleep(LISTEN_PING_S)
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), LISTEN_PING_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - database away: cached keys fall back to the short TTL
                log.warning("key revocation listener lost; auth cache entries now live at most a few seconds")
            finally:
                on_listening(False)
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
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

    def watch_revocations(self, on_revoked: Callable[[str], None], on_listening: Callable[[bool], None]) -> None:
        """No push on SQLite: cached keys live at most the short TTL (api.state.UNPUSHED_TTL_S)."""

    async def close(self) -> None:
        return None


async def make_hot_reads(settings: Settings, engine: AsyncEngine) -> HotReads:
    if settings.async_database_url().startswith("postgresql+asyncpg"):
        return await AsyncpgReads.connect(settings)
    return SqlAlchemyReads(engine)
