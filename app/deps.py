"""Dependencies, as ``Annotated`` aliases so route signatures read like sentences."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from app.db import session_scope
from app.settings import Settings
from app.storage import Storage, open_storage

LOCAL_OWNER = "local"


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; committed when the route returns, rolled back if it raises."""
    with session_scope(request.app.state.settings.resolved_database_url) as session:
        yield session


def get_storage(request: Request) -> Storage:
    return open_storage(request.app.state.settings.resolved_storage_url)


def get_owner() -> str:
    """The caller. Single-user until API keys arrive; every row already has an owner."""
    return LOCAL_OWNER


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
OwnerDep = Annotated[str, Depends(get_owner)]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="page size")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="from next_cursor")]
