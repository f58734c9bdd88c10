"""Answers to the reads clients poll, kept for a moment (``GRAFT_POLL_CACHE_S``, 0.5 s).

Most traffic is clients polling a job. Within the window, a repeated poll of a job (or of a
page of jobs) is answered from memory, without a thread or a database connection; who a key
belongs to is remembered for the same window. A job changed through this API process (submit,
cancel) is forgotten at once; progress written by workers shows within the window. Each API
process keeps its own; nothing is shared or persisted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable

MAX_ENTRIES = 10_000


class Window:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[Hashable, tuple[float, str, str]] = {}
        self._flights: dict[tuple[Hashable, str], asyncio.Future[str]] = {}

    async def through(
        self, key: Hashable, owner: str, fetch: Callable[[], Awaitable[tuple[str, str]]]
    ) -> str:
        """The remembered answer, or ``fetch()``'s (``(owner, answer)``), fetched once however
        many requests ask for it at the same moment (no stampede when an answer expires)."""
        if (value := self.get(key, owner)) is not None:
            return value
        flight = self._flights.get((key, owner))
        if flight is not None:
            return await asyncio.shield(flight)
        flight = asyncio.get_running_loop().create_future()
        self._flights[(key, owner)] = flight
        try:
            fetched_owner, value = await fetch()
            self.put(key, fetched_owner, value)
            flight.set_result(value)
            return value
        except BaseException as exc:
            flight.set_exception(exc)
            flight.exception()  # retrieved: a flight nobody else awaited is not an error
            raise
        finally:
            del self._flights[(key, owner)]

    def get(self, key: Hashable, owner: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic() or entry[1] != owner:
            return None
        return entry[2]

    def put(self, key: Hashable, owner: str, value: str) -> str:
        if self.seconds > 0:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (time.monotonic() + self.seconds, owner, value)
        return value

    def forget(self, key: Hashable | None = None) -> None:
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)


class PollCache:
    def __init__(self, seconds: float) -> None:
        self.jobs = Window(seconds)  # job id -> its JSON
        self.pages = Window(seconds)  # (owner, query) -> a page of jobs, as JSON
        self.owners = Window(seconds)  # API key (None: no key) -> its owner

    def remember_owner(self, key: str | None, owner: str) -> None:
        self.owners.put(key, "", owner)

    def changed(self, job_id: str) -> None:
        """A job was written through this process: its answers are stale."""
        self.jobs.forget(job_id)
        self.pages.forget()
