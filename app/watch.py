"""Live job events for every open stream of this API process, from one poller.

However many clients follow jobs, one task reads all the jobs they follow in one query every
``interval`` seconds and wakes the streams whose job changed. Between polls a stream is an
awaiting coroutine: it holds no thread and no database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import Database
from app.jobs import job_read
from app.schemas import JobRead
from core.models import Job, JobStatus

log = logging.getLogger(__name__)


@dataclass
class _Watched:
    job: JobRead
    followers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class JobWatch:
    def __init__(self, database: Database, interval: float = 0.5, keepalive: float = 15.0) -> None:
        self.database = database
        self.interval = interval
        self.keepalive = keepalive
        self._watched: dict[str, _Watched] = {}
        self._poller: asyncio.Task | None = None

    @property
    def following(self) -> int:
        """How many streams are open."""
        return sum(w.followers for w in self._watched.values())

    async def events(self, first: JobRead) -> AsyncIterator[str]:
        """Server-sent events for one job, starting from ``first`` (already read, and checked
        to belong to the caller): ``status`` when its status changes, ``progress`` when
        anything else does, a comment line as keep-alive; the stream ends after the final
        status."""
        watched = self._watched.setdefault(first.id, _Watched(first))
        watched.followers += 1
        self._ensure_poller()
        try:
            job, sent, last, last_status = first, 0, None, None
            while True:
                payload = job.model_dump_json()
                if payload != last:
                    kind = "status" if job.status != last_status else "progress"
                    sent += 1
                    yield f"event: {kind}\nid: {sent}\ndata: {payload}\n\n"
                    last, last_status = payload, job.status
                if JobStatus(job.status).is_final:
                    return
                if watched.job is job:  # nothing new yet: wait for the poller's next change
                    try:
                        await asyncio.wait_for(watched.changed.wait(), self.keepalive)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                job = watched.job
        finally:
            watched.followers -= 1
            if not watched.followers:
                self._watched.pop(first.id, None)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="job-watch")

    async def _poll(self) -> None:
        while self._watched:
            await asyncio.sleep(self.interval)
            ids = list(self._watched)
            if not ids:
                return
            try:
                jobs = await self.database.run(partial(_read, ids=ids))
            except Exception:  # the database is away: streams wait, and resume when it is back
                log.warning("could not read followed jobs", exc_info=True)
                continue
            for job in jobs:
                watched = self._watched.get(job.id)
                if watched is not None and job != watched.job:
                    watched.job = job
                    watched.changed.set()
                    watched.changed = asyncio.Event()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller


def _read(session: Session, *, ids: list[str]) -> list[JobRead]:
    return [job_read(job) for job in session.scalars(select(Job).where(Job.id.in_(ids)))]
