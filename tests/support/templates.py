"""Data folders made once and copied per test: a test that needs a registered model or a grown
version starts from a copy of a folder where that was done through the real API, instead of
doing it again (registering runs the model in three runtimes, about 2 s; a job about 3 s)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from core.db import get_engine
from core.settings import Settings

SQLITE_SIDE_FILES = ("graft.db-wal", "graft.db-shm")


def freeze(settings: Settings) -> Path:
    """Close ``settings``' database and fold its write-ahead log into the file, so that the
    folder copies as it stands; its data folder."""
    get_engine(settings.resolved_database_url).dispose()
    database = settings.data_dir / "graft.db"
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    return settings.data_dir


def copy_data_folder(template: Path, data_dir: Path) -> None:
    """``template``'s database (copied), artifacts (hard-linked: the store never writes into a
    file it has stored, it replaces or deletes it, so no test can change the template's; and
    they take no disk twice) and (empty) queue and scratch folders, at ``data_dir``."""
    if not template.is_dir():
        raise RuntimeError(
            f"the template {template} was removed before this test: tests/conftest.py removes "
            "it after the last test that copies it, and pytest-xdist must hand out test "
            "modules in collection order (--no-loadscope-reorder, as `make test` does)"
        )
    shutil.copytree(
        template,
        data_dir,
        ignore=shutil.ignore_patterns(*SQLITE_SIDE_FILES),
        copy_function=_link_unless_database,
    )


def _link_unless_database(source: str, target: str) -> None:
    if Path(source).name == "graft.db":
        shutil.copy2(source, target)
    else:
        os.link(source, target)
