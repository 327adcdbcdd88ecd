"""Run the Alembic migrations from code (``ssql up``, ``ssql migrate``, tests), same scripts as the CLI."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from persistence.settings import Settings


def alembic_config(settings: Settings) -> Config:
    """An Alembic config pointing at the packaged scripts and the settings' database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["database_url"] = settings.sync_database_url()
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade_head(settings: Settings) -> None:
    if settings.is_sqlite():
        settings.resolved_home().mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), "head")


def downgrade_base(settings: Settings) -> None:
    command.downgrade(alembic_config(settings), "base")
