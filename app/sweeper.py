"""The API's background thread: re-rings the broker for jobs it lacks, re-queues jobs of dead
workers, delivers due webhooks, and removes what nothing owns (core.janitor).

While the broker is down (a message could not be sent, or the last sweep could not reach it)
the sweep runs every second, so jobs submitted meanwhile are sent within about a second of
its return; otherwise every ``sweep_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.webhooks import deliver_due
from core import janitor, job_state
from core.db import session_scope, utcnow
from core.models import Job, JobStatus
from core.queue import publish_failed, publish_jobs, waiting_in_broker
from core.settings import Settings

log = logging.getLogger(__name__)


# A job queued this recently may be between its commit and its message; not lost yet.
PUBLISH_GRACE_S = 5.0


def sweep(
    session: Session,
    settings: Settings,
    waiting: set[str] | None,
    broker_up: bool = True,
    now: datetime | None = None,
) -> list[str]:
    """Find the jobs whose doorbell must ring again; return their ids, to publish after commit.

    - queued, and the broker holds no message for them (``waiting``: the ids it holds):
      submitted while the broker was down, or lost by it. Where the broker cannot be read
      (``waiting`` is None), those queued longer than ``requeue_after_s``. Nothing while the
      broker is down (``broker_up`` False): they are sent once it is back;
    - running with an expired lease (the worker died): queued again, or failed once
      ``max_attempts`` are used up, or cancelled if a cancel was asked for.

    Claiming is conditional, so the rare duplicate message is harmless.
    """
    now = now or utcnow()
    republish = _lost(session, settings, waiting, now) if broker_up else []
    hard_limit = timedelta(seconds=settings.job_time_limit_s + settings.job_time_grace_s)
    expired = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested, Job.started_at).where(
            Job.status == JobStatus.RUNNING,
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
        )
    ).all()
    for job_id, attempt, max_attempts, cancel_requested, started_at in expired:
        past_limit = started_at is not None and now - started_at > hard_limit
        outcome = job_state.recover(
            session, job_id, attempt, now, cancel_requested, past_limit, max_attempts
        )
        if outcome == JobStatus.QUEUED:
            republish.append(job_id)
    return republish if broker_up else []


def _lost(
    session: Session, settings: Settings, waiting: set[str] | None, now: datetime
) -> list[str]:
    if waiting is None:  # a broker that cannot be read: ring again after a while
        stale = now - timedelta(seconds=settings.requeue_after_s)
        ids = list(
            session.scalars(
                select(Job.id).where(Job.status == JobStatus.QUEUED, Job.queued_at < stale)
            )
        )
        if ids:
            job_state.ring_again(session, ids, now)
        return ids
    settled = now - timedelta(seconds=PUBLISH_GRACE_S)
    queued = session.scalars(
        select(Job.id).where(Job.status == JobStatus.QUEUED, Job.queued_at < settled)
    )
    return [job_id for job_id in queued if job_id not in waiting]


class Sweeper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker_up = True
        self._urgent_until = 0.0  # sweep every second until then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def run_once(self) -> int:
        """One sweep; returns how many jobs were sent to the broker."""
        if publish_failed.is_set():  # until what it missed is past the grace and sent
            publish_failed.clear()
            self._urgent_until = time.monotonic() + PUBLISH_GRACE_S + 2
        try:
            waiting = waiting_in_broker(self.settings)
            if not self.broker_up:
                log.info("the broker is back; sending the jobs queued meanwhile")
            self.broker_up = True
        except Exception as exc:
            if self.broker_up:
                log.warning("the broker is unreachable (%s); queued jobs wait for it", exc)
            self.broker_up, waiting = False, None
        with session_scope(self.settings.resolved_database_url) as session:
            ids = sweep(session, self.settings, waiting, broker_up=self.broker_up)
        return publish_jobs(self.settings, ids) if ids else 0

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.settings.sweep_interval_s
        clean_every = self.settings.janitor_every_s
        next_clean = time.monotonic() + min(clean_every, 300.0)
        while not self._stop.wait(1.0):
            try:
                deliver_due(self.settings)
                if time.monotonic() >= next_clean:
                    next_clean = time.monotonic() + clean_every
                    janitor.clean(self.settings)
                now = time.monotonic()
                urgent = not self.broker_up or publish_failed.is_set() or now < self._urgent_until
                if urgent or now >= next_sweep:
                    next_sweep = now + self.settings.sweep_interval_s
                    self.run_once()
            except Exception:
                log.warning("sweep failed", exc_info=True)
