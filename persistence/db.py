"""Engine and session factories: synchronous (worker, CLI, Alembic) and asyncio (API).

SQLite gets WAL mode and a busy timeout so the embedded API and worker can write concurrently.
Timestamps are always passed from Python in UTC so SQL stays the same on SQLite and Postgres.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from persistence.settings import Settings


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes: read them as the UTC they were written in."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(settings: Settings) -> Engine:
    """Synchronous engine; creates the SQLite folder when needed."""
    url = settings.sync_database_url()
    if settings.is_sqlite():
        settings.resolved_home().mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def make_async_engine(settings: Settings) -> AsyncEngine:
    """Asyncio engine for the API (asyncpg on Postgres, aiosqlite on SQLite)."""
    url = settings.async_database_url()
    if settings.is_sqlite():
        settings.resolved_home().mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=20, max_overflow=10, pool_pre_ping=False)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def make_async_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)
