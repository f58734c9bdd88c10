"""The database's migrations (Alembic), applied by `graft db upgrade`, `graft serve` and tests."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def db_upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to ``revision``; safe to run on every start."""
    from alembic import command
    from alembic.config import Config

    settings.ensure_dirs()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", settings.resolved_database_url.replace("%", "%%"))
    command.upgrade(config, revision)
