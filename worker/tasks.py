"""Thin Celery tasks: receive an id, delegate to the pipeline."""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_shutting_down

from app.settings import get_settings
from worker.celery_app import RUN_JOB_TASK
from worker.pipeline import run_job, shutdown_requested


@shared_task(name=RUN_JOB_TASK, ignore_result=True)
def run_job_task(job_id: str) -> None:
    run_job(job_id, get_settings())


@worker_shutting_down.connect
def _hand_back_running_job(**_: object) -> None:
    """SIGTERM: the running job stops at its next check and goes back to the queue."""
    shutdown_requested.set()
