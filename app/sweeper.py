"""The API's background thread: re-rings the broker for jobs it lacks, re-queues jobs of dead
workers, delivers due webhooks, and removes what nothing owns (app.janitor).

While the broker is down (a message could not be sent, or the last sweep could not reach it)
the sweep runs every second, so jobs submitted meanwhile are sent within about a second of
its return; otherwise every ``sweep_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time

from app import janitor
from app.db import session_scope
from app.jobs import PUBLISH_GRACE_S, sweep
from app.queue import publish_failed, publish_jobs, waiting_in_broker
from app.settings import Settings
from app.webhooks import deliver_due

log = logging.getLogger(__name__)


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
        clean_every = max(self.settings.orphan_grace_s / 4, 60.0)
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
