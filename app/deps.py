"""Dependencies, as ``Annotated`` aliases so route signatures read like sentences.

A request touches the database in one piece of work: one session, in one worker thread,
authenticated and committed before the thread is let go (``Db``). At most ``POOL_SIZE``
requests work at once; the others wait in the event loop, holding neither a thread nor a
connection. So a request never holds a connection while it waits for a thread, and never holds
a thread while it waits for a connection: however many clients poll, nothing deadlocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import KEY_PREFIX, authenticate
from app.pollcache import PollCache
from core.db import POOL_SIZE, session_scope
from core.errors import Unauthorized
from core.inputs import INT4_MAX
from core.settings import Settings
from core.storage import Storage, open_storage

T = TypeVar("T")


class Database:
    """The API's way into the database: ``await database.run(work)`` runs ``work(session)`` in
    a worker thread with a session of its own, committed when ``work`` returns (rolled back if
    it raises), with at most ``slots`` pieces of work at once."""

    def __init__(self, url: str, slots: int = POOL_SIZE) -> None:
        self.url = url
        self.slots = slots
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, work: Callable[[Session], T]) -> T:
        if self._semaphore is None:  # created in the server's event loop
            self._semaphore = asyncio.Semaphore(self.slots)
        async with self._semaphore:
            return await run_in_threadpool(self._in_session, work)

    def _in_session(self, work: Callable[[Session], T]) -> T:
        with session_scope(self.url) as session:
            return work(session)


class Db:
    """The request's authenticated way into the database: ``await db(work)`` runs
    ``work(session, owner)``, where ``owner`` is who the request's key belongs to (the key is
    checked in the same session)."""

    def __init__(
        self, database: Database, host: str, key: str | None, poll_cache: PollCache
    ) -> None:
        self.database, self.host, self.key = database, host, key
        self.poll_cache = poll_cache

    async def __call__(self, work: Callable[[Session, str], T]) -> T:
        def unit(session: Session) -> T:
            owner = authenticate(session, self.host, self.key)
            self.poll_cache.remember_owner(self.key, owner)
            return work(session, owner)

        return await self.database.run(unit)

    async def known_owner(self) -> str:
        """Who the key belongs to: as checked within GRAFT_POLL_CACHE_S, else checked now
        (once for every request asking at the same moment)."""

        async def check() -> tuple[str, str]:
            return "", await self.owner()

        return await self.poll_cache.owners.through(self.key, "", check)

    async def owner(self) -> str:
        """Who the request's key belongs to, checked in a short session of its own (for
        requests whose long work, such as an upload, must not hold a transaction open)."""
        return await self(lambda _session, owner: owner)

    def actor(self, owner: str) -> str:
        """Who is acting, for the record: the owner, and the prefix of the key used, if any."""
        if self.key is None:
            return owner
        return f"{owner} (key {self.key.removeprefix(KEY_PREFIX).split('_', 1)[0]})"


# Dependencies are coroutines: a plain function would take a worker thread for nothing.
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return open_storage(request.app.state.settings)


bearer = HTTPBearer(auto_error=False, description="an API key from `graft keys create`")


async def get_db(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Db:
    if credentials is None and request.headers.get("authorization"):
        raise Unauthorized(
            "the Authorization header must read `Bearer <key>`: the key was sent without "
            "`Bearer ` before it"
        )
    return Db(
        request.app.state.database,
        request.app.state.settings.host,
        credentials.credentials if credentials else None,
        request.app.state.poll_cache,
    )


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DbDep = Annotated[Db, Depends(get_db)]
LimitQuery = Annotated[int, Query(ge=1, le=500, description="page size")]
VersionPath = Annotated[int, Path(ge=1, le=INT4_MAX, description="a version number")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="from next_cursor")]
