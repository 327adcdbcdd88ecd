"""Alembic is the only way the schema is made: upgrade, downgrade and upgrade again on Postgres."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect

from persistence.migrate import downgrade_base, upgrade_head
from persistence.models import Base
from persistence.settings import Settings
from tests.service.conftest import create_database


def _tables(url: str) -> set[str]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_on_postgres(tmp_path: Path) -> None:
    url, drop = create_database("ssql_migr")
    try:
        settings = Settings(home=tmp_path, database_url=url)
        expected = set(Base.metadata.tables)
        upgrade_head(settings)
        assert expected <= _tables(url)
        downgrade_base(settings)
        assert _tables(url) & expected == set()
        upgrade_head(settings)
        assert expected <= _tables(url)
    finally:
        drop()


def test_schema_matches_models(sessions, settings) -> None:  # type: ignore[no-untyped-def]
    """The migrations produce exactly the tables and columns the code maps (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(settings.sync_database_url())
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff
