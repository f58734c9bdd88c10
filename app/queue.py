"""Ringing the broker's doorbell: only a job id travels, never the job itself."""

from __future__ import annotations

import logging

from app.settings import Settings
from worker.celery_app import RUN_JOB_TASK, celery_for

log = logging.getLogger(__name__)


def publish_jobs(settings: Settings, job_ids: list[str]) -> int:
    """Send each id; a failure is logged, not raised: the job is safe in the database and the
    sweep sends it again. Returns how many were sent."""
    sent = 0
    for job_id in job_ids:
        try:
            celery_for(settings).send_task(RUN_JOB_TASK, args=[job_id])
            sent += 1
        except Exception:  # the broker is down; the sweep will retry
            log.warning("could not publish job %s; the sweep will retry", job_id, exc_info=True)
    return sent


def broker_reachable(settings: Settings) -> bool:
    try:
        with celery_for(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
