"""A job's lifecycle on a worker: claim the row, keep its lease alive, fence every final
write on the attempt number, and retry those writes while the database is away.

- ``claim_job``: queued -> running, attempt + 1, a lease; None if someone else has it.
- ``Heartbeat``: extends the lease, flushes progress, reads the cancel flag, once a second.
- ``fenced_finish`` / ``finish``: the final status, only while this attempt owns the job.
- ``release``: back to the queue without using up an attempt (shutdown, database gone).

Every write to the job's row goes through ``core.job_state``, the job state machine; the API
side (re-queueing jobs whose lease ran out) is ``app.sweeper.sweep``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from core import job_state
from core.db import session_scope
from core.disk import below_floor
from core.logs import current_job
from core.models import Job, JobStatus
from core.queue import publish_jobs
from core.scratch import scratch
from core.settings import Settings
from engine.errors import JobCancelled, resource_error
from engine.expand import Progress

log = logging.getLogger(__name__)
T = TypeVar("T")


class LeaseLost(Exception):
    """Another attempt owns the job now (our lease expired and the sweep re-queued it)."""


def claim_job(settings: Settings, job_id: str) -> int | None:
    """Take the job if it is queued; return our attempt number, or None."""
    worker = f"{socket.gethostname()}/{os.getpid()}"
    with session_scope(settings.resolved_database_url) as session:
        return job_state.claim(session, job_id, settings.job_lease_s, worker)


# Set when the worker process is asked to stop (SIGTERM): the running job is handed back.
shutdown_requested = threading.Event()


class StopReason(enum.StrEnum):
    LOST = "lost"  # another attempt owns the job
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"
    DISK_FULL = "disk_full"  # the worker's disk fell below GRAFT_MIN_FREE_DISK_MB


class Heartbeat:
    """Keeps the lease alive, flushes progress, reads the cancel flag and looks at the disk,
    every ``GRAFT_HEARTBEAT_S``; knows why the job should stop, if it should."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings, self.job_id, self.attempt = settings, job_id, attempt
        self.cancel_requested = False
        self.lost = False
        self.disk_full: str | None = None  # why, once the disk fell below the floor
        self.deadline = time.monotonic() + settings.job_time_limit_s
        self._pending: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, progress: Progress) -> None:
        with self._lock:
            self._pending = asdict(progress)

    @property
    def stop_reason(self) -> StopReason | None:
        if self.lost:
            return StopReason.LOST
        if self.cancel_requested:
            return StopReason.CANCELLED
        if shutdown_requested.is_set():
            return StopReason.SHUTDOWN
        if time.monotonic() > self.deadline:
            return StopReason.TIMEOUT
        if self.disk_full:
            return StopReason.DISK_FULL
        return None

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def _run(self) -> None:
        current_job.set(self.job_id)  # threads do not inherit the context
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.beat()
            except Exception:  # a database hiccup: the lease has slack, try again next second
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def beat(self) -> None:
        self.disk_full = self.disk_full or below_floor(self.settings)
        with self._lock:
            pending, self._pending = self._pending, None
        with session_scope(self.settings.resolved_database_url) as session:
            kept, self.cancel_requested = job_state.beat(
                session, self.job_id, self.attempt, self.settings.job_lease_s, pending
            )
        self.lost = self.lost or not kept


def job_error(code: str, message: object) -> dict[str, str]:
    return {"code": code, "message": str(message)}


def database_unreachable(exc: BaseException) -> bool:
    """A lost or refused database connection (worth retrying), not a bad statement."""
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    )


@contextmanager
def job_folder(settings: Settings, job_id: str) -> Iterator[Path]:
    """The attempt's own temporary folder (a killed attempt's is removed by the next one)."""
    with scratch(settings.tmp_dir, prefix=f"job-{job_id}-") as tmp:
        yield tmp


def with_retries(settings: Settings, what: str, write: Callable[[], T]) -> T:
    """Run a database write, retrying with backoff while the database is unreachable, for up
    to ``db_retry_s``; a disk that is full is not retried."""
    deadline = time.monotonic() + settings.db_retry_s
    delay = 0.25
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if (
                not database_unreachable(exc)
                or resource_error(exc) is not None
                or time.monotonic() + delay > deadline
            ):
                raise
            log.warning("%s: the database is unreachable; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def fenced_finish(
    session: Session, job_id: str, attempt: int, status: JobStatus, **values: Any
) -> bool:
    """Set the final status if this attempt still owns the job; False if it does not. A
    success is not written over a cancel request: cancelling wins until this write (see
    :func:`not_recorded`)."""
    return job_state.finish(session, job_id, attempt, status, **values)


def not_recorded(session: Session, job_id: str, attempt: int) -> Exception:
    """Why :func:`fenced_finish` wrote no success: the user cancelled meanwhile
    (:class:`JobCancelled`: the attempt's files are discarded and the job is cancelled), or
    another attempt owns the job (:class:`LeaseLost`)."""
    row = session.execute(
        select(Job.attempt, Job.status, Job.cancel_requested).where(Job.id == job_id)
    ).one()
    if tuple(row) == (attempt, JobStatus.RUNNING, True):
        return JobCancelled()
    return LeaseLost()


def finish(
    settings: Settings,
    job_id: str,
    attempt: int,
    status: JobStatus,
    error: dict[str, str] | None,
) -> None:
    def write() -> None:
        with session_scope(settings.resolved_database_url) as session:
            fenced_finish(session, job_id, attempt, status, error=error)

    try:
        with_retries(settings, f"job {job_id}: recording {status}", write)
    except Exception:  # its lease runs out, and the sweep takes it from there
        log.exception("job %s: could not record %s", job_id, status)
        return
    log.info("job %s: %s %s", job_id, status, error or "")


def stopped(heartbeat: Heartbeat) -> None:
    """Record why the engine stopped at ``heartbeat``'s request (not for a shutdown or a lost
    lease: those write nothing)."""
    settings, job_id, attempt = heartbeat.settings, heartbeat.job_id, heartbeat.attempt
    if heartbeat.stop_reason is None:  # cancelled at the final write, before a beat saw it
        with contextlib.suppress(Exception):
            heartbeat.beat()
    reason = heartbeat.stop_reason
    if reason == StopReason.DISK_FULL:
        error = job_error("disk_full", heartbeat.disk_full)
        finish(settings, job_id, attempt, JobStatus.FAILED, error)
    elif reason == StopReason.CANCELLED:
        finish(settings, job_id, attempt, JobStatus.CANCELLED, None)
    elif reason == StopReason.TIMEOUT:
        limit = settings.job_time_limit_s
        error = job_error("timeout", f"the job ran longer than {limit:.0f} s")
        finish(settings, job_id, attempt, JobStatus.FAILED, error)


def release(settings: Settings, job_id: str, attempt: int, why: str) -> None:
    """Hand the job back to the queue, as if this attempt had not begun: a worker told to stop
    (or a database that went away mid-job) is not the job's failure, so it uses up none of the
    job's attempts. The attempt number is handed back too, which is safe because this attempt
    writes nothing after this."""

    def write() -> bool:
        with session_scope(settings.resolved_database_url) as session:
            return job_state.hand_back(session, job_id, attempt, why)

    try:
        released = with_retries(settings, f"job {job_id}: handing it back", write)
    except Exception:  # its lease runs out, and the sweep re-queues it
        log.exception("job %s: could not hand it back", job_id)
        return
    if released:
        publish_jobs(settings, [job_id])
        log.info("job %s: handed back to the queue (%s)", job_id, why)
