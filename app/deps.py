"""Dependencies, as ``Annotated`` aliases so route signatures read like sentences."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import KEY_PREFIX, authenticate
from app.db import session_scope
from app.settings import Settings
from app.storage import Storage, open_storage


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; committed when the route returns, rolled back if it raises."""
    with session_scope(request.app.state.settings.resolved_database_url) as session:
        yield session


def get_storage(request: Request) -> Storage:
    return open_storage(request.app.state.settings)


bearer = HTTPBearer(auto_error=False, description="an API key from `graft keys create`")


def get_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The owner every query of the request is scoped to (see app.auth). Checked in a short
    session of its own, so a long response (an event stream) holds no transaction open."""
    settings = request.app.state.settings
    with session_scope(settings.resolved_database_url) as session:
        return authenticate(session, settings.host, credentials and credentials.credentials)


def get_actor(
    owner: Annotated[str, Depends(get_owner)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """Who is acting, for the record: the owner, and the prefix of the key used, if any."""
    if credentials is None:
        return owner
    prefix = credentials.credentials.removeprefix(KEY_PREFIX).split("_", 1)[0]
    return f"{owner} (key {prefix})"


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# "function" scope: the commit happens before the response is sent, so a 2xx is never answered
# for a write that then fails to commit.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]
OwnerDep = Annotated[str, Depends(get_owner)]
ActorDep = Annotated[str, Depends(get_actor)]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="page size")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="from next_cursor")]
