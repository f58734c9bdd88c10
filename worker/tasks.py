"""Thin Celery tasks: receive an id, delegate to the pipeline."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from core.queue import RUN_JOB_TASK
from core.settings import get_settings
from worker.lifecycle import shutdown_requested
from worker.pipeline import run_job


@shared_task(name=RUN_JOB_TASK, ignore_result=True)
def run_job_task(job_id: str) -> None:
    if shutdown_requested.is_set():  # stopping: leave the job (and its message) to others
        raise Reject("the worker is shutting down", requeue=True)
    run_job(job_id, get_settings())


@worker_shutting_down.connect
def _hand_back_running_job(**_: object) -> None:
    """SIGTERM: the running job stops at its next check and goes back to the queue."""
    shutdown_requested.set()
